#!/usr/bin/env bash
# Issue #5's GPU figures in one device call: model / pipeline / system on 3000x2500 JPEGs with the
# full-size network compiled, its A/B runs, and the network alone (a batch sweep), within DEADLINE_S.
# docs/benchmarks.md (its H100 section, and "What limits the rate now") has the figures and the procedure. Before the call, on the CPU machine, from the
# repository root, fetch the service packages the device image lacks (Python 3.12 wheels, 15 MB):
#
#     bash bench/gpu/fetch_wheels.sh        # into the git-ignored .whl/
#
# then run `bash bench/gpu/run_throughput.sh` with carry [".whl"].
#
# Settings (environment variables):
#   IMAGES   images for the pipeline and system stages (default 1000; 200 distinct JPEGs, repeated)
#   BATCH    forward batch (default 16: the fastest of 8..128 on an H100, 2026-11-27)
#   WEIGHTS  the full-size network's weights (default shipped: the shipped model's trained network
#            carried in it, the same cost per pass and a trained network's masks; random: random
#            weights, whose speckled masks are the worst case for postprocessing, as measured on
#            2026-11-27)
#   CHECKPOINT  a trained checkpoint to measure instead of the full-size network, e.g.
#            model/checkpoints/btxrd-256.pt
#   TTA      INFER_TTA for every stage (default off: one pass per image, comparable with earlier
#            figures; auto: the checkpoint's own mode, flip4 for the shipped BTXRD model)
#   CHUNK    images per task (default 128)
#   IO       decode/encode threads per worker (default 12)
#   LIMIT_S  seconds the end-to-end run may take (default 200; the A/B runs 150 each; SWEEP_LIMIT_S,
#            each sweep, 75)
#   DEADLINE_S  seconds the whole script may take (default 540, under the device tool's 600 s per
#            command): every step's limit is cut to what is left less 45 s, and a step that would get
#            under 45 s (and less than it asked for) is skipped, exit 99 for the first one. Steps run in order of what the issue asks: the compiled end-to-end
#            run, the same batch as one job in 8 parts from 4 clients to 4 API processes, 1 and 2
#            worker processes on the GPU, its pipeline with one nvJPEG call per image, one chunk at a time,
#            the sweep, the sweep with cuDNN's heuristics, the sweep with the BatchNorms folded
#   OUT      where the results go (the device tool sets it; default runs/gpu-bench)
#   PYTHON   default python3
#   SWEEP    forward batches for the network-alone sweep (default 16,64,128; empty: no sweep)
#   SWEEP_IMAGES  images per batch size in the sweep (default 1024)
#   CUDNN_AB  1 (default): the sweep again with --cudnn-benchmark off, for the A/B; 0: not
#   FOLD_AB  1 (default): the sweep again with --fold-bn on (the BatchNorms folded into the convolutions, as
#            CPU workers serve the network in float32 since 2026-12-07; under bf16, CUDA's, it is served as
#            trained: folding moved the pooled Dice by -0.001 there and its speed on a GPU is unmeasured); 0: not
#   CONCURRENCY_AB  1 (default): pipeline and system again with one chunk at a time
#            (--worker-concurrency 1, the solo pool of before 2026-12-06) against the default two
#            (WORKER_CONCURRENCY=auto on a GPU), for the A/B; 0: not
#   PARTS_AB  1 (default): the system again with the batch sent as one job in 8 parts by 4 clients
#            to the API under gunicorn with 4 processes (--parts 8 --uploaders 4 --api-workers 4):
#            a job sent whole cannot be processed faster than one request is uploaded, nor before
#            its last byte has arrived (docs/benchmarks.md); 0: not
#   JOBS_AB  0 (default): 1: the same as 8 jobs sent whole (--jobs 8), as measured before parts
#   DECODE_AB  1 (default): the pipeline again with each JPEG its own nvJPEG call (--gpu-decode-batch off, as
#            before 2026-12-07 14:00) against a forward batch's in one call: torchvision runs every call under
#            one process-wide lock and synchronises at its end, and gives a call's baseline JPEGs to the JPEG
#            engines (A100, H100) as one batch (worker/gpu_decode.py); 0: not
#   WORKERS_AB  1 (default): the system again with 2 worker processes sharing the GPU (--workers 2; the bench
#            first runs 1 worker for its scaling line): one process's finishing holds Python's lock ~13% of
#            its CPU time, ~1.4 ms an image, and the rest of its Python work ~0.3 more, so one process may
#            not pass ~600 images/s whatever its cores (docs/benchmarks.md, 2026-12-07 10:00 and 11:00); 0: not
#
# What comes back in $OUT: bench-log.txt (everything printed), bench.json (the compiled run),
# bench-decode-per-image.json (its pipeline with one nvJPEG call per image),
# bench-parts.json (its system as one job in 8 parts), bench-two-workers.json (1 and 2 worker processes on the
# GPU), bench-jobs.json (as 8 jobs, with JOBS_AB=1) and bench-one-chunk.json (its pipeline and system with one
# chunk at a time).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-runs/gpu-bench}
PY=${PYTHON:-python3}
IMAGES=${IMAGES:-1000}
BATCH=${BATCH:-16}
MODEL_ARGS=(--full "${WEIGHTS:-shipped}")
[ -n "${CHECKPOINT:-}" ] && MODEL_ARGS=(--checkpoint "$CHECKPOINT")
MODEL_ARGS+=(--tta "${TTA:-off}")  # the network alone by default; TTA=auto serves a checkpoint as it recommends
CHUNK=${CHUNK:-128}
IO=${IO:-12}
LIMIT_S=${LIMIT_S:-200}
DEADLINE_S=${DEADLINE_S:-540}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/bench-log.txt") 2>&1
TEE=$!
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
# limit WANTED: WANTED seconds, or what is left before DEADLINE_S less 45 s of margin (a stopped step's
# clean-up, -k 30, and the log); 0 to skip: under 45 s left and fewer than WANTED
limit() {
    local left=$(( DEADLINE_S - ($(date +%s) - T0) - 45 ))
    if (( $1 <= left )); then echo "$1"; elif (( left < 45 )); then echo 0; else echo "$left"; fi
}
# step NAME WANTED_S ARGS...: python -m bench ARGS under the limit; a step skipped for time returns 99
step() {
    local name=$1 l
    l=$(limit "$2")
    shift 2
    if [ "$l" = 0 ]; then
        stamp "SKIPPED (DEADLINE_S=$DEADLINE_S: too little time left): $name"
        return 99
    fi
    stamp "$name (limit ${l}s)"
    timeout -s INT -k 30 "$l" "$PY" -m bench "$@"
    local rc=$?
    stamp "done: $name (exit $rc; 124 or 137: stopped at its time limit)"
    return $rc
}
for v in LIMIT_S DEADLINE_S SWEEP_LIMIT_S; do
    [[ "${!v:-0}" =~ ^[0-9]+$ ]] || { echo "$v must be a whole number of seconds, got '${!v}'"; exit 2; }
done

if ls .whl/*.whl > /dev/null 2>&1; then
    stamp "installing the carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" - <<'EOF' || { echo "preflight failed: a package the system stage needs is missing"; exit 1; }
import worker.tasks, api  # noqa: F401  the system stage's imports, first: the worker sets OpenMP's wait policy before torch loads
from importlib.metadata import version
import celery, cv2, kombu, sqlalchemy, torch  # noqa: F401
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, opencv {cv2.__version__}, "
      f"celery {celery.__version__}, flask {version('flask')}, sqlalchemy {sqlalchemy.__version__}")
try:
    import torchvision
    print(f"torchvision {torchvision.__version__} (nvJPEG decoding)")
except ImportError as e:
    print(f"no torchvision: JPEGs decode on the CPU ({e})")
EOF
timeout 90 "$PY" - <<'EOF' || echo "nvJPEG check failed or took over 90 s (the runs go on)"
# a forward batch's JPEGs in one nvJPEG call (GPU_DECODE_BATCH=on) against one call each and against Pillow
import time
import numpy as np, torch
from worker.decode import decode_image
from worker.gpu_decode import GpuJpegDecoder, gpu_decode_unavailable
from bench.throughput import radiograph_jpeg
if gpu_decode_unavailable("cuda"):
    print(f"no nvJPEG check: {gpu_decode_unavailable('cuda')}")
    raise SystemExit(0)
files = [radiograph_jpeg(i, 2500, 3000) for i in range(16)]  # the bench's radiographs, ~0.8 MB each
decoder = GpuJpegDecoder("cuda")
for _ in range(2):  # the second round is timed
    torch.cuda.synchronize(); t0 = time.perf_counter()
    together = decoder.decode_batch(files); torch.cuda.synchronize(); t1 = time.perf_counter()
    alone = [decoder(f) for f in files]; torch.cuda.synchronize(); t2 = time.perf_counter()
same = all(torch.equal(a.pixels, b.pixels) for a, b in zip(together, alone))
off = max(int(np.abs(a.pixels.cpu().numpy().astype(int) - decode_image(f).pixels).max()) for a, f in zip(together, files))
print(f"nvJPEG, 16 JPEGs of ~3000x2500 from one thread: {16 / (t1 - t0):.0f} img/s in one call, "
      f"{16 / (t2 - t1):.0f} one call each; the same pixels either way: {same}; at most {off} gray levels from Pillow's")
# preparing their frames on the GPU (INTER_AREA from each pixel's taps) against the dense matrices used before 2026-12-07
from model.preprocess import Preprocessor
pre, weights = Preprocessor(512, 0.5, 0.25), {}
def dense_weights(dst, src, device):
    if (dst, src) not in weights:
        scale, j = src / dst, torch.arange(src, dtype=torch.float64, device=device)
        e = torch.arange(dst + 1, dtype=torch.float64, device=device) * scale
        overlap = torch.minimum(e[1:, None], j[None] + 1) - torch.maximum(e[:-1, None], j[None])
        weights[dst, src] = (overlap.clamp_min_(0) / scale).to(torch.float32)
    return weights[dst, src]
def dense(pixels):  # prepare_tensor as it was, for a shrinking image
    g = pre.geometry(*pixels.shape)
    unit = pixels.to(torch.float32).div_(255.0)
    unit = dense_weights(g.scaled_h, g.orig_h, pixels.device) @ unit @ dense_weights(g.scaled_w, g.orig_w, pixels.device).T
    frame = torch.zeros((pre.size, pre.size), dtype=torch.float32, device=pixels.device)
    frame[g.top : g.top + g.scaled_h, g.left : g.left + g.scaled_w] = unit
    return frame.sub_(pre.mean).div_(pre.std)
pixels, ms = [image.pixels for image in together], {}
for name, prepare in (("taps", lambda p: pre.prepare_tensor(p)[0]), ("dense", dense)) * 2:  # the second round is timed
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for p in pixels:
        prepare(p)
    torch.cuda.synchronize(); ms[name] = 1000 * (time.perf_counter() - t0) / len(pixels)
print(f"preparing a frame on the GPU, one thread: {ms['taps']:.3f} ms per image from the taps, "
      f"{ms['dense']:.3f} by the dense matrices used before")
EOF

SWEEP=${SWEEP-16,64,128}
END_TO_END=("${MODEL_ARGS[@]}" --compile --batch "$BATCH" --images "$IMAGES" --chunk "$CHUNK" --io-threads "$IO")
step "model / pipeline / system, compiled, batch $BATCH, $IMAGES images, chunk $CHUNK, $IO io threads" "$LIMIT_S" \
    "${END_TO_END[@]}" --json "$OUT/bench.json"
rc=$?
if [ "${PARTS_AB:-1}" = 1 ]; then
    # a job sent whole is capped by its own upload (about 300 MB/s, 370 radiographs/s, on 2026-11-27 and 2026-12-06)
    step "system again, the batch as one job in 8 parts by 4 clients, API under gunicorn x4" 150 \
        "${END_TO_END[@]}" --stages system --parts 8 --uploaders 4 --api-workers 4 --json "$OUT/bench-parts.json"
fi
if [ "${WORKERS_AB:-1}" = 1 ]; then
    # one worker process per GPU: its threads share one Python lock, which its finishing holds ~1.3 ms an image
    step "system again with 2 worker processes sharing the GPU (after 1 worker, for the scaling line)" 180 \
        "${END_TO_END[@]}" --stages system --workers 2 --json "$OUT/bench-two-workers.json"
fi
if [ "${DECODE_AB:-1}" = 1 ] && "$PY" -c "import torchvision" 2> /dev/null; then
    # nvJPEG was called once per image from the pool's threads until 2026-12-07; never measured either way
    step "pipeline again with one nvJPEG call per image (--gpu-decode-batch off)" 100 \
        "${END_TO_END[@]}" --stages pipeline --gpu-decode-batch off --json "$OUT/bench-decode-per-image.json"
fi
if [ "${JOBS_AB:-0}" = 1 ]; then
    step "system again, the batch as 8 jobs by 4 clients, API under gunicorn x4" 150 \
        "${END_TO_END[@]}" --stages system --jobs 8 --uploaders 4 --api-workers 4 --json "$OUT/bench-jobs.json"
fi
if [ "${CONCURRENCY_AB:-1}" = 1 ]; then
    # two chunks at once (the default on a GPU since 2026-12-06) was measured only with a stand-in device on a CPU
    step "pipeline / system again with one chunk at a time (--worker-concurrency 1)" 150 \
        "${END_TO_END[@]}" --stages pipeline,system --worker-concurrency 1 --json "$OUT/bench-one-chunk.json"
fi
if [ -n "$SWEEP" ]; then
    step "${MODEL_ARGS[*]}: the network alone, plain (channels_last, bf16 autocast on CUDA), batches $SWEEP" \
        "${SWEEP_LIMIT_S:-75}" "${MODEL_ARGS[@]}" --sweep-batches "$SWEEP" --images "${SWEEP_IMAGES:-1024}"
    if [ "${CUDNN_AB:-1}" = 1 ]; then
        # CUDNN_BENCHMARK=on (the default since 2026-12-03) was never measured against cuDNN's heuristics for serving
        step "the same sweep with --cudnn-benchmark off (cuDNN's heuristics, as before 2026-12-03)" \
            "${SWEEP_LIMIT_S:-75}" "${MODEL_ARGS[@]}" --sweep-batches "$SWEEP" --images "${SWEEP_IMAGES:-1024}" \
            --cudnn-benchmark off
    fi
    if [ "${FOLD_AB:-1}" = 1 ]; then
        # folding measured on a 2-core CPU only (+5% in float32); on CUDA the BatchNorms are passes of their own
        step "the same sweep with --fold-bn on (BatchNorms folded into the convolutions)" \
            "${SWEEP_LIMIT_S:-75}" "${MODEL_ARGS[@]}" --sweep-batches "$SWEEP" --images "${SWEEP_IMAGES:-1024}" \
            --fold-bn on
    fi
fi
stamp "all done"
exec >&- 2>&-
wait "$TEE"  # bench-log.txt complete before the device tool collects $OUT
exit $rc
