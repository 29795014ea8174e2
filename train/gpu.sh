#!/usr/bin/env bash
# Both training stages on a GPU machine (the device tool), from packed caches; results into $OUT.
#
# Here, first:   python -m train.pack                      (runs/carry/train.npz, val.npz: < 56 MiB)
#                pip download pycocotools into .whl/        (see models/README.md, "Training on a GPU")
# Then one call: device run, carry ["runs/carry", ".whl"], command "bash train/gpu.sh", timeout 600.
# Back here:     python -m train.train --eval-only --out DIR  (export + runtime eval of DIR/best.pt)
#
# The device gives 15 minutes a session, start-up included: the default stages take about 9.
set -euo pipefail
CONFIG=${CONFIG:-train/configs/person.toml}
CARRY=${CARRY:-runs/carry}
RUNS=${RUNS:-runs}
FLOAT_MIN=${FLOAT_MIN:-3}
BINARY_MIN=${BINARY_MIN:-5.5}
BATCH=${BATCH:-128}
FLOAT_LR=${FLOAT_LR:-0.004}
BINARY_LR=${BINARY_LR:-0.002}
WORKERS=${WORKERS:-12}
PRECISION=${PRECISION:-bf16}  # training forwards in bfloat16 (float32 for the last tenth); fp32 to turn it off
MODEL_ARGS=${MODEL_ARGS:-}  # e.g. "--res-blocks 2" or "--widths 64,64,128,256,256": both stages get it
VAL_EVERY=${VAL_EVERY:-2}  # minutes; each validation (921 images, decode, COCO eval) takes ~15 s of the budget
OUT=${OUT:-runs/gpu-out}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba-cache
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "cores $(nproc); shared memory: $(df -h /dev/shm 2>/dev/null | tail -1)"
# shellcheck disable=SC2206
common=(--config "$CONFIG" --packed "$CARRY" $MODEL_ARGS --batch-size "$BATCH" --workers "$WORKERS" --threads 4 --val-every "$VAL_EVERY"
        --precision "$PRECISION" --no-export)
"$PY" -m train.train --float-twin "${common[@]}" --minutes "$FLOAT_MIN" --lr "$FLOAT_LR" \
    --out "$RUNS/gpu-float" 2>&1 | tr '\r' '\n' | grep -v "^train " | tee "$OUT/float.log"
"$PY" -m train.train "${common[@]}" --minutes "$BINARY_MIN" --lr "$BINARY_LR" \
    --init-from "$RUNS/gpu-float/best.pt" --teacher "$RUNS/gpu-float/best.pt" \
    --out "$RUNS/gpu" 2>&1 | tr '\r' '\n' | grep -v "^train " | tee "$OUT/binary.log"
cp "$RUNS/gpu-float/best.pt" "$OUT/float-best.pt"
cp "$RUNS/gpu-float/history.json" "$OUT/float-history.json"
cp "$RUNS/gpu/best.pt" "$OUT/binary-best.pt"
cp "$RUNS/gpu/history.json" "$OUT/binary-history.json"
cp "$RUNS/gpu/curves.png" "$OUT/binary-curves.png"
ls -la "$OUT"
