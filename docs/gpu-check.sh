#!/usr/bin/env bash
# The GPU measurements still open (docs/scale.md, docs/hash.md), as one call of the device tool: about 9 minutes
# of a 15-minute one-GPU lease, so the lease's start and the transfers fit around it. Prepared 2026-12-04; never
# yet run (no GPU was lent to the sessions that wrote it). Here, before the call, copy the scene beside the code
# (out/ is git-ignored; the data is never committed, and `rm -r out/gpu-data` after the call):
#   mkdir -p out/gpu-data && cp -r ../shared/data/nerf_synthetic/lego out/gpu-data/
# then: run(command="bash docs/gpu-check.sh", carry=["out/gpu-data"], timeout_s=600). It runs under the device's
# own python3 (its torch, not our pin). What it writes under $OUT comes back: one log per check, to be recorded with
# the date, commit and the GPU's name in docs/hash.md and docs/scale.md.
# On this machine, a smoke test of the commands on the CPU:
#   OUT=out/gpu-check DATA=../shared/data/nerf_synthetic/lego EXP7_S=3 EXP1_S=3 DOWNSCALE=8 bash docs/gpu-check.sh
# (3.5 minutes here on 2026-12-04: exp7 ran, the CUDA tests skipped, exp1's gpu800 probe outran its 100 s limit on
# the CPU and was stopped, child included, leaving only its header line.)
set -u
OUT=${OUT:-out/gpu-check}
DATA=${DATA:-out/gpu-data/lego}
EXP7_S=${EXP7_S:-300}     # exp7's budget: the target is >= 35.5 dB on the val views within 5 minutes
EXP1_S=${EXP1_S:-30}      # exp1 gpu800's probe: its step rate and PSNR at 15 s (the target's run is 15 min)
DOWNSCALE=${DOWNSCALE:-1} # 1 = the views' own 800 x 800
PY=${PY:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/machine.txt"

# 1. exp7 at 800 x 800, white background: PSNR on the 10 val views at 15 s, 1 and 5 minutes of training. The hash
# keys are a starting point scaled from Instant-NGP's (16 levels, 2^19 entries, finest 2048), not tuned on a GPU;
# gpu800's EMB_DIM 256 is the frequency MLP's width, so exp7 keeps its own 64.
timeout 400 "$PY" bench.py --quality --exps=exp7 --data="$DATA" --budget_s="$EXP7_S" --recipe=gpu800 \
    --downscale="$DOWNSCALE" --emb_dim=64 --hash_levels=16 --hash_log2_size=19 --hash_finest_res=2048 \
    > "$OUT/exp7_gpu800.txt" 2>&1

# 2. The CUDA-graph step against the eager one, the hash model among them (skipped on a CPU).
timeout 90 "$PY" -m pytest -o addopts=-q -p no:cacheprovider tests/test_cuda_graph.py > "$OUT/cuda_graph.txt" 2>&1

# 3. exp1 gpu800 for EXP1_S seconds: the steps per second that tell whether 15 minutes can reach 33.7 dB.
timeout 100 "$PY" bench.py --quality --exps=exp1 --data="$DATA" --budget_s="$EXP1_S" --recipe=gpu800 \
    --downscale="$DOWNSCALE" > "$OUT/exp1_gpu800.txt" 2>&1
tail -n 4 "$OUT"/*.txt
