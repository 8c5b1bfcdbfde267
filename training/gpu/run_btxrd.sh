#!/usr/bin/env bash
# Train the thesis and the strong recipe (and optionally a warm restart) on real BTXRD-256 on one GPU, evaluate them on the
# grouped split, and leave the checkpoints and the reports in $OUT. One command for a session
# that is lent a GPU through the device tool (docs/training.md, "On a GPU", has the whole
# procedure). Before the call, on the CPU machine, from the repository root:
#
#     mkdir -p devdata && cp -r ../shared/data/btxrd-256 devdata/    # /devdata/ is git-ignored
#
# then run `bash training/gpu/run_btxrd.sh` with carry ["devdata/btxrd-256"] and timeout_s 600.
#
# Assumptions about the GPU machine (checked by the preflight step): `python3` has torch with
# CUDA, numpy and opencv-python-headless (the device image has them; nothing is installed here);
# the repository is the working directory's parent's parent of this script.
#
# Settings (environment variables):
#   MINUTES   wall-clock training budget per config (default 5.5); the configs train at the
#             same time on the one GPU (PARALLEL=1), so the whole command takes about
#             MINUTES + 2.5 minutes
#   CONFIGS   which runs (default "thesis strong"): the presets thesis and strong from scratch, and
#             "warm", a warm restart of the shipped model (model/checkpoints/btxrd-256.pt, its
#             16..256 network at 256 px) with the strong recipe at lr 3e-4 (WARM_ARGS)
#   PARALLEL  1: train the configs concurrently on the GPU; 0: one after the other
#   DATA      default devdata/btxrd-256
#   SPLIT     default training/splits/btxrd-256-grouped-v1.csv
#   OUT       where the results go (the device tool sets it; default runs/gpu-out)
#   WARM_ARGS  flags for the warm run (default: the shipped checkpoint's network, lr 3e-4, batch 16);
#             EXTRA_ARGS come after them and win, so leave network flags out of EXTRA_ARGS with warm
#   EXTRA_ARGS more flags for training.train, every run (a dry run on a CPU: REQUIRE_CUDA=0 MINUTES=0.1
#             EXTRA_ARGS="--size 64 --filters 8,16,32,64 --max-train 24 --max-val 12")
#   REQUIRE_CUDA  1 (default): stop when torch sees no GPU
#
# What comes back in $OUT (at most 8 files, each under 16 MiB, as the device tool requires):
#   btxrd-256-<config>.pt   the checkpoints, fp16 weights (about 16 MB for the full network)
#   summary.md              one table: epochs, stop reason, val and test Dice per config
#   reports.tar.gz          every report.md / metrics.json / per_image.csv / examples.png,
#                           the per-epoch metrics, the training logs and TensorBoard files
#   log.txt                 this script's output
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

DATA=${DATA:-devdata/btxrd-256}
SPLIT=${SPLIT:-training/splits/btxrd-256-grouped-v1.csv}
MINUTES=${MINUTES:-5.5}
CONFIGS=${CONFIGS:-"thesis strong"}
PARALLEL=${PARALLEL:-1}
OUT=${OUT:-runs/gpu-out}
WORK=runs/gpu
PY=${PYTHON:-python3}
EXTRA_ARGS=${EXTRA_ARGS:-}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$WORK"  # results of an earlier run on this checkout must not mix into this one's summary
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

finish() {
    stamp "packing results"
    for cfg in $CONFIGS; do
        [ -f "$WORK/btxrd-256-$cfg.pt" ] && cp "$WORK/btxrd-256-$cfg.pt" "$OUT/"
    done
    "$PY" training/gpu/summarize.py "$WORK" $CONFIGS > "$OUT/summary.md" 2>&1
    cat "$OUT/summary.md"
    tar czf "$OUT/reports.tar.gz" -C "$WORK" --exclude='*.pt' . 2>/dev/null
    ls -la "$OUT"
}
trap finish EXIT

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
REQUIRE_CUDA=$REQUIRE_CUDA "$PY" - <<'EOF' || { echo "preflight: python3 lacks torch/numpy/cv2 or a GPU"; exit 1; }
import os, cv2, numpy, torch
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, numpy {numpy.__version__}, opencv {cv2.__version__}")
assert torch.cuda.is_available() or os.environ["REQUIRE_CUDA"] == "0", "no CUDA device visible to torch"
EOF
[ -f "$DATA/dataset.csv" ] || { echo "no $DATA/dataset.csv: copy ../shared/data/btxrd-256 to devdata/ and carry it"; exit 1; }
"$PY" -m training.btxrd "$DATA" | tee "$WORK/data-summary.txt"
sha256sum "$SPLIT"

stamp "preflight: a tiny run on 32 real images (catches errors before the long runs)"
"$PY" -m training.train --config strong --data "$DATA" --split-file "$SPLIT" --max-train 32 --max-val 16 \
    --size 64 --filters 8,16,32,64 --epochs 2 --out "$WORK/preflight.pt" --progress false --tensorboard false \
    > "$WORK/preflight.log" 2>&1 \
  && "$PY" -m training.evaluate "$WORK/preflight.pt" --data "$DATA" --split-file "$SPLIT" --split val \
    --max-images 16 --examples 2 --out-dir "$WORK/preflight-eval" >> "$WORK/preflight.log" 2>&1 \
  || { tail -40 "$WORK/preflight.log"; echo "preflight failed: not starting the long runs"; exit 1; }
tail -3 "$WORK/preflight.log"
rm -rf "$WORK/preflight"* 

WARM_ARGS=${WARM_ARGS:-"--init-from model/checkpoints/btxrd-256.pt --filters 16,32,64,128,256 --size 256 --lr 3e-4 --batch-size 16 --warmup-epochs 1 --thresholds 0.05,0.07,0.10,0.15,0.20,0.25,0.30,0.40,0.50"}
train_one() {
    local cfg=$1 recipe
    case $cfg in
        warm) recipe="--config strong $WARM_ARGS" ;;
        *) recipe="--config $cfg" ;;
    esac
    "$PY" -m training.train $recipe --data "$DATA" --split-file "$SPLIT" --max-minutes "$MINUTES" \
        --out "$WORK/btxrd-256-$cfg.pt" --half $EXTRA_ARGS > "$WORK/train-$cfg.log" 2>&1
    echo "$cfg: exit $?" >> "$WORK/train-status.txt"
}

stamp "training $CONFIGS for $MINUTES min each (parallel=$PARALLEL)"
if [ "$PARALLEL" = 1 ]; then
    pids=()
    for cfg in $CONFIGS; do train_one "$cfg" & pids+=($!); done
    wait "${pids[@]}"  # not a bare wait: that would also wait for the tee that logs this script
else
    for cfg in $CONFIGS; do train_one "$cfg"; done
fi
cat "$WORK/train-status.txt"
for cfg in $CONFIGS; do
    echo "--- $cfg"; grep -E "^(data|stopped|best epoch|saved)" "$WORK/train-$cfg.log"; tail -2 "$WORK/train-$cfg.log"
done

evaluate_one() {
    local cfg=$1 ckpt="$WORK/btxrd-256-$1.pt" split
    [ -f "$ckpt" ] || return 0
    for split in val test; do
        "$PY" -m training.evaluate "$ckpt" --data "$DATA" --split-file "$SPLIT" --split "$split" \
            --out-dir "$WORK/eval-$cfg-$split" > "$WORK/eval-$cfg-$split.log" 2>&1
        if [ "$cfg" != thesis ]; then  # the strong recipe chose thresholds for flip and flip4 TTA
            "$PY" -m training.evaluate "$ckpt" --data "$DATA" --split-file "$SPLIT" --split "$split" --tta flip \
                --out-dir "$WORK/eval-$cfg-$split-tta" > "$WORK/eval-$cfg-$split-tta.log" 2>&1
            "$PY" -m training.evaluate "$ckpt" --data "$DATA" --split-file "$SPLIT" --split "$split" --tta flip4 \
                --out-dir "$WORK/eval-$cfg-$split-flip4" > "$WORK/eval-$cfg-$split-flip4.log" 2>&1
        fi
    done
}

stamp "evaluating (each config's evaluations run beside the other's)"
pids=()
for cfg in $CONFIGS; do evaluate_one "$cfg" & pids+=($!); done
wait "${pids[@]}"
tail -n 2 "$WORK"/eval-*.log
stamp "done"
