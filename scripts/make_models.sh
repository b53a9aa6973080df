#!/usr/bin/env bash
# Rebuild every model shipped in model_repository/ from scratch: the exact commands, data and
# seeds recorded in each manifest. CPU, 2 cores: about 10 minutes for the DCGAN.
set -euo pipefail
cd "$(dirname "$0")/.."
GF=.venv/bin/ganforge

$GF train dcgan --data shapes --steps 3000 --seed 0 --out runs/dcgan_shapes
$GF export runs/dcgan_shapes --repository model_repository --name dcgan_shapes
