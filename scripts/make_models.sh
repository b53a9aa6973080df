#!/usr/bin/env bash
# Rebuild every model shipped in model_repository/ from scratch: the exact commands, data and
# seeds recorded in each manifest. CPU, 2 cores: about 10 minutes for the DCGAN.
set -euo pipefail
cd "$(dirname "$0")/.."
GF=.venv/bin/ganforge

$GF train dcgan --data shapes --steps 3000 --batch-size 64 --n-images 8192 --z-dim 64 --ngf 32 \
    --ndf 32 --resolution 64 --lr-g 0.0002 --lr-d 0.0002 --label-smoothing 0.1 --instance-noise 0.1 \
    --d-dropout 0.0 --sample-every 100 --seed 0 --out runs/dcgan_shapes
$GF export runs/dcgan_shapes --repository model_repository --name dcgan_shapes
