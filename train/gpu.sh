#!/usr/bin/env bash
# Training on a CUDA machine from packed caches: the float twin, then the binary net from it; results into $OUT.
#
# Beside the data:  make pack       runs/carry/train.npz, val.npz (< 56 MiB, images at data.pack_long_side),
#                                   and the pycocotools wheel in .whl/ (for a CUDA machine that is offline)
# On the machine:   bash train/gpu.sh, with runs/carry and .whl carried along (about 9 minutes as set below)
#                   The cache stays resident on the GPU and every augmentation runs there (train.batches =
#                   device); each stage's log reports training images/s.
# Back beside the data, with binary-best.pt as DIR/best.pt:
#                   python -m train.train --eval-only --out DIR  (export, threshold, runtime evaluation)
#                   float-best.npz is the teacher's compact weights, to keep in the repository.
set -euo pipefail
CONFIG=${CONFIG:-train/configs/person.toml}
CARRY=${CARRY:-runs/carry}
RUNS=${RUNS:-runs}
FLOAT_MIN=${FLOAT_MIN:-3}
BINARY_MIN=${BINARY_MIN:-5.5}
BATCH=${BATCH:-256}
FLOAT_LR=${FLOAT_LR:-0.004}
BINARY_LR=${BINARY_LR:-0.002}
DISTILL=${DISTILL:-1}  # gain of the binary net's distillation from the twin's head
BATCHES=${BATCHES:-device}  # device: the cache resident on the GPU, batches made there; cpu: worker processes
WORKERS=${WORKERS:-12}  # with BATCHES=cpu
PRECISION=${PRECISION:-bf16}  # training forwards in bfloat16 (float32 for the last tenth); fp32 to turn it off
# The shipped topology; the twin drops the ternary layers itself. Both stages get these.
MODEL_ARGS=${MODEL_ARGS:---set model.res_blocks=3 --set model.ternary=[2,4]}
VAL_EVERY=${VAL_EVERY:-2}  # minutes; each validation (1,685 images, decode, COCO eval) takes ~20 s of the budget
OUT=${OUT:-runs/gpu-out}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba-cache
mkdir -p "$OUT"
if ! "$PY" -c "import pycocotools" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "cores $(nproc); shared memory: $(df -h /dev/shm 2>/dev/null | tail -1)"
# shellcheck disable=SC2206
common=(--config "$CONFIG" --packed "$CARRY" $MODEL_ARGS --set train.batch_size="$BATCH" --set train.batches="$BATCHES" --set train.workers="$WORKERS"
        --set train.threads=4 --set train.val_every_minutes="$VAL_EVERY" --set train.precision="$PRECISION" --no-export)
"$PY" -m train.train --float-twin "${common[@]}" --set train.minutes="$FLOAT_MIN" --set train.lr="$FLOAT_LR" \
    --out "$RUNS/gpu-float" 2>&1 | tr '\r' '\n' | grep -v "^train " | tee "$OUT/float.log"
"$PY" -m train.train "${common[@]}" --set train.minutes="$BINARY_MIN" --set train.lr="$BINARY_LR" \
    --set train.init_from="$RUNS/gpu-float/best.pt" --set train.teacher="$RUNS/gpu-float/best.pt" --set train.distill="$DISTILL" \
    --out "$RUNS/gpu" 2>&1 | tr '\r' '\n' | grep -v "^train " | tee "$OUT/binary.log"
# Seven files to take back, each under 16 MiB: the teacher as compact weights, the binary checkpoint for
# --eval-only (python -m train.weights DIR/best.pt models/NAME.npz --exact keeps it beside the data), logs, curves.
"$PY" -m train.weights "$RUNS/gpu-float/best.pt" "$OUT/float-best.npz"
cp "$RUNS/gpu-float/history.json" "$OUT/float-history.json"
cp "$RUNS/gpu/best.pt" "$OUT/binary-best.pt"
cp "$RUNS/gpu/history.json" "$OUT/binary-history.json"
cp "$RUNS/gpu/curves.png" "$OUT/binary-curves.png"
ls -la "$OUT"
