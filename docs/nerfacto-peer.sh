#!/usr/bin/env bash
# nerfstudio's nerfacto beside exp7 on this CPU: the same 200x200 lego views, the same training seconds, one run at
# a time, both scored by utils.psnr / utils.ssim on the same 10 val views (results: docs/fullres.md).
#   bash docs/nerfacto-peer.sh [SCENE] [WORK]     from the repo root, the project's venv active
# WORK (outside the repo) gets nerfacto's own venv (3.5 GB: nerfstudio 1.1.5 beside this machine's torch 2.13.0),
# the prepared views and the runs. Nothing here is part of the project or its requirements.
set -euo pipefail
SCENE=${1:-../shared/data/nerf_synthetic/lego}
WORK=${2:-../nerfacto-peer}
BUDGET=${BUDGET:-600}           # training seconds of each run
RAYS=${RAYS:-1024}              # nerfacto's rays per step: exp7's batch (its default, 4096: RAYS="1024 4096")
PEER="$WORK/venv/bin/python"

[ -x "$PEER" ] || { python3 -m venv "$WORK/venv" && "$PEER" -m pip install torch==2.13.0 nerfstudio==1.1.5; }
[ -f "$WORK/lego200/transforms_test.json" ] || python docs/nerfacto_peer.py prepare "$SCENE" "$WORK/lego200" 4

# exp7 as its 200x200 recipe runs it, on the prepared views (already 200x200: --downscale=1)
python exp7.py --recipe=cpu200 --data="$WORK/lego200" --downscale=1 --time_budget_s="$BUDGET" \
    --out_dir="$WORK/exp7" --video_frames=0 --wandb=disabled
python eval.py "$WORK/exp7" --data="$WORK/lego200" --split=test

# nerfacto with the options of nerfstudio's own Blender benchmark (scripts/benchmarking/launch_train_blender.sh),
# on the CPU with its pure-torch hash grid; no evaluation during training (exp7's budget excludes its own)
for rays in $RAYS; do
    "$PEER" docs/nerfacto_peer.py train "$BUDGET" nerfacto \
        --pipeline.model.background-color white --pipeline.model.proposal-initial-sampler uniform \
        --pipeline.model.near-plane 2. --pipeline.model.far-plane 6. --pipeline.model.camera-optimizer.mode off \
        --pipeline.model.use-average-appearance-embedding False --pipeline.model.distortion-loss-mult 0 \
        --pipeline.model.disable-scene-contraction True \
        --pipeline.datamanager.train-num-rays-per-batch "$rays" \
        --machine.device-type cpu --pipeline.model.implementation torch --vis tensorboard \
        --steps-per-eval-batch 0 --steps-per-eval-image 0 --steps-per-eval-all-images 0 \
        --steps-per-save 1000000000 --max-num-iterations 1000000000 \
        --output-dir "$WORK/nerfacto$rays" --experiment-name lego --timestamp run blender-data --data "$WORK/lego200"
    "$PEER" docs/nerfacto_peer.py render "$WORK/nerfacto$rays/lego/nerfacto/run/config.yml" \
        "$WORK/nerfacto$rays/renders.npy"
    python docs/nerfacto_peer.py score "$WORK/lego200" "$WORK/nerfacto$rays/renders.npy"
done
