#!/usr/bin/env bash
# Rebuild every model shipped in model_repository/ from scratch: the exact commands, data and
# seeds recorded in each manifest. CPU, 2 cores: about 10 minutes for the DCGAN, 25 for the
# ProGAN, 130 for the denoiser, 30 for fill_thinplate,
# 15 for inpainter_photos, 100 for inpainter_shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
GF=.venv/bin/ganforge

$GF train dcgan --preset default --data shapes --steps 3000 --batch-size 64 --n-images 8192 --z-dim 64 --ngf 32 \
    --ndf 32 --resolution 64 --lr-g 0.0002 --lr-d 0.0002 --label-smoothing 0.1 --instance-noise 0.1 \
    --d-dropout 0.0 --sample-every 100 --seed 0 --out runs/dcgan_shapes
$GF export runs/dcgan_shapes --repository model_repository --name dcgan_shapes
# INT8 as version 2 beside the FP32 version 1, the version served by default (docs/quantization.md);
# the generator alone gets the same calibration, so both give the same images for the same latents
$GF export model_repository/dcgan_shapes --precision int8 --version 2
$GF export model_repository/dcgan_shapes_generator --precision int8 --version 2

# the Progressive GAN: narrow blocks, phases of 6,400 images, 10,000 steps at 64 px
# (training/presets/progan/shipped.toml, docs/progan.md)
$GF train progan --preset shipped --data shapes --seed 0 --out runs/progan_shapes
$GF export runs/progan_shapes --repository model_repository --name progan_shapes

# the denoiser: 8,000 steps on mostly downscaled crops, then two fine-tunes on crops at the
# photos' own resolution (docs/denoising.md)
$GF train denoiser --data photos --steps 8000 --batch-size 32 --patch 48 --sigma 5.0 55.0 \
    --lr 0.001 --width 48 --depth 10 --seed 0 --out runs/denoiser_photos
$GF train denoiser --data photos --steps 2000 --batch-size 32 --patch 48 --sigma 5.0 55.0 \
    --lr 0.0003 --width 48 --depth 10 --crop-scale 0.0 0.15 --pool 16384 \
    --init runs/denoiser_photos --seed 1 --out runs/denoiser_photos_ft
$GF train denoiser --data photos --steps 3000 --batch-size 32 --patch 48 --sigma 5.0 55.0 \
    --lr 0.0002 --width 48 --depth 10 --crop-scale 0.0 0.1 --pool 32768 \
    --init runs/denoiser_photos_ft --seed 2 --out runs/denoiser_photos_ft2
$GF export runs/denoiser_photos_ft2 --repository model_repository --name denoiser_photos --tile 128
$GF export model_repository/denoiser_photos --precision int8 --version 2

# fill_thinplate: a learned blend of three classical fills, scored on a band of known pixels
# around each hole, trained on pairs balanced by which fill wins, the step kept by validation
# (docs/inpainting.md; the settings are training/presets/inpainter/photos.toml)
$GF train inpainter --preset photos --out runs/inpainter_balanced
$GF export runs/inpainter_balanced --repository model_repository --name fill_thinplate --tile 64

# the context encoders, whose network paints the hole, served at any height and width:
# on 64 px crops of the training photos (the doctor in auto mode), and on procedural shapes
$GF train context-encoder --preset photos --steps 6000 --batch-size 16 --threads 2 \
    --checkpoint-every 250 --doctor auto --out runs/ce_photos_auto
$GF export runs/ce_photos_auto --repository model_repository --name inpainter_photos --any-size
$GF train context-encoder --preset shapes --steps 9000 --threads 1 --out runs/ce_shapes_9000
$GF export runs/ce_shapes_9000 --repository model_repository --name inpainter_shapes --any-size
