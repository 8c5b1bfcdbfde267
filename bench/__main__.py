"""`python -m bench`: how close the whole system comes to the network alone.

    python -m bench --quick                  # shipped model, 16 images: under a minute on the 2-core CPU
    python -m bench --full --images 200      # the thesis network (random weights) at 512, 200 images
    python -m bench --full shipped --images 200   # the same network carrying the shipped model's: a trained network's masks
    python -m bench --full --images 160 --chunk 8 --workers 2 --pin-workers --stages system   # 1 vs 2 workers, a core each
    python -m bench --full --sweep-batches 1,2,4,8,16 --images 16   # the network alone per forward batch
    python -m bench --memory                 # worker RSS over 5,000 images; API RSS against upload size
    python -m bench --broker redis           # Redis + a fresh PostgreSQL database instead of the embedded SQLite
    python -m bench --batch 16 --chunk 32 --images 192 --standin-device 30 --worker-concurrency 2   # an off-CPU network
    python -m bench ... --jobs 6 --api-workers 2   # the batch as 6 jobs sent one after another, the API under gunicorn
    python -m bench ... --parts 6 --uploaders 2    # the batch as one job in 6 parts, two sent at once

On generated radiograph-sized JPEGs (3000x2500 by default, cached under
var/bench/) it measures, in one run:

- model:    the network alone on preprocessed batches (Segmenter.forward),
            half of the images before the other stages and half after them,
            so that a shared host's change of speed during the run shows
            (drift_pct, and a warning past 10%) and mostly cancels;
- pipeline: decode -> preprocess -> network -> postprocess -> mask PNG (and
            overlay PNG with --overlays eager; by default the API renders
            overlays on request, worker/overlay.py), in this process
            (worker.pipeline.Pipeline, the worker's code);
- system:   HTTP upload -> broker -> worker process(es) -> statistics
            committed, from the first byte uploaded to the API reporting the job done;

and prints a table with pipeline/model and system/model. The model and
pipeline stages run with the same torch thread count (--threads) and forward
batch (--batch) as the workers, which get them as TORCH_THREADS and
INFER_BATCH_SIZE, so the ratios compare like with like. With --workers K the
system runs K worker processes of --threads (default 1) threads each and is
compared with one such worker and with K times the model figure.
The last line reads
`bench: model=<x> pipeline=<y> system=<z> img/s, system/model=<r>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bonedetect.openmp import prefer_passive_wait

prefer_passive_wait()  # as the workers do (worker/app.py), before this process imports torch

from bench import throughput as tp  # noqa: E402


# --fold-bn -> Segmenter(fold_bn=...): None folds where the network runs in float32, as workers do
FOLD_BN = {"auto": None, "on": True, "off": False}


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 3000x2500, got {text!r}") from None
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return h, w


def concurrency_arg(text: str) -> int | None:
    """--worker-concurrency: parsed as WORKER_CONCURRENCY is (None: auto)."""
    from bonedetect.settings import positive_or_auto

    try:
        return positive_or_auto({"--worker-concurrency": text}, "--worker-concurrency")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    from bonedetect.settings import (ALLOCATOR_MODES, CPU_BF16_MODES, CUDNN_BENCHMARK_MODES, GPU_DECODE_BATCH_MODES,
                                     GPU_DECODE_MODES, IO_PRIORITY_MODES, JPEG_DECODE_MODES, OVERLAY_MODES, TTA_MODES,
                                     Settings)

    s = Settings.from_env()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, help="checkpoint to run (default: the shipped model, model.checkpoint.DEFAULT_CHECKPOINT)")
    model.add_argument("--full", nargs="?", const="random", choices=tp.FULL_SIZE_WEIGHTS,
                       help="the full-size thesis network UNetConfig() at 512 with random weights (the worst case for "
                            "postprocessing: specks over the whole image), or with 'shipped', the shipped model's trained "
                            "network carried in it (the same cost per pass, a trained network's masks)")
    p.add_argument("--images", type=int, help="images per stage (default 100; --quick 16; --memory 5000)")
    p.add_argument("--size", type=parse_size, help="image size HxW (default 3000x2500; --memory 1000x800)")
    p.add_argument("--workers", type=int, default=1, help="worker processes for the system stage (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per worker and for the model/pipeline stages "
                   "(default: PyTorch's default with one worker, 1 with several)")
    p.add_argument("--pin-workers", action="store_true",
                   help="system stage: worker i runs on core i only (round robin), as with a one-CPU container per worker")
    p.add_argument("--batch", type=int, default=s.infer_batch_size,
                   help=f"forward batch (INFER_BATCH_SIZE, now {s.infer_batch_size or 'auto'}; "
                        "auto: 16 on CUDA, 1-16 on a CPU by the network's size)")
    p.add_argument("--chunk", type=int, default=s.chunk_size, help=f"images per task (CHUNK_SIZE, now {s.chunk_size})")
    p.add_argument("--io-threads", type=int, default=s.io_threads, help=f"pipeline decode/encode threads (IO_THREADS, now {s.io_threads})")
    p.add_argument("--io-priority", choices=IO_PRIORITY_MODES, default=s.io_priority,
                   help=f"IO_PRIORITY for the pipeline and the workers (now {s.io_priority}): idle: the decode/encode "
                        "threads run on the cores the network leaves free, without preempting it (SCHED_IDLE); auto: "
                        "idle where the network runs on the CPU (not under --standin-device)")
    p.add_argument("--worker-concurrency", type=concurrency_arg, default=s.worker_concurrency,
                   help=f"chunks each worker holds at once, sharing its model, and chunks the pipeline stage runs at once "
                        f"(WORKER_CONCURRENCY, now {s.worker_concurrency or 'auto'}; auto: 2 on a GPU host, 1 on a CPU)")
    p.add_argument("--broker", choices=("sqlite", "redis"), default="sqlite",
                   help="sqlite: the embedded default; redis: Redis on 127.0.0.1:6379 and a fresh PostgreSQL database")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (model and pipeline stages)")
    p.add_argument("--cudnn-benchmark", choices=CUDNN_BENCHMARK_MODES, default=s.cudnn_benchmark,
                   help=f"CUDNN_BENCHMARK for every stage (now {s.cudnn_benchmark}; CUDA only): cuDNN times its "
                        "algorithms for the frames' shape and keeps the fastest, or chooses by heuristics")
    p.add_argument("--fold-bn", choices=("auto", "on", "off"), default="auto",
                   help="auto (as workers serve it): the network with its BatchNorms folded into its convolutions "
                        "where it runs in float32 (a CPU without bf16), as trained under bf16 (CUDA); on: folded; "
                        "off: layer by layer, as trained. Model and pipeline stages and --sweep-batches only")
    p.add_argument("--gpu-decode", choices=GPU_DECODE_MODES, default=s.gpu_decode,
                   help="GPU_DECODE for the pipeline and the workers (default auto): nvJPEG where the network runs on CUDA")
    p.add_argument("--gpu-decode-batch", choices=GPU_DECODE_BATCH_MODES, default=s.gpu_decode_batch,
                   help="GPU_DECODE_BATCH for the pipeline and the workers (default on): with JPEGs decoded on the GPU, "
                        "a forward batch's in one nvJPEG call; off: one call per image")
    p.add_argument("--allocator", choices=ALLOCATOR_MODES, default=s.allocator,
                   help=f"ALLOCATOR for the workers and, so that the stages compare like with like, this process "
                        f"(now {s.allocator}; bonedetect/allocator.py)")
    p.add_argument("--overlays", choices=OVERLAY_MODES, default=s.overlays,
                   help=f"OVERLAYS for the pipeline and the workers (now {s.overlays}); lazy: the API renders on request")
    p.add_argument("--jpeg-decode", choices=JPEG_DECODE_MODES, default=s.jpeg_decode,
                   help=f"JPEG_DECODE for the pipeline and the workers (now {s.jpeg_decode}); reduced: with lazy overlays, "
                        "JPEGs are decoded at 1/2-1/8 of their size when the network's frame is that small")
    p.add_argument("--cpu-bf16", choices=CPU_BF16_MODES, default=s.infer_cpu_bf16,
                   help=f"INFER_CPU_BF16 for the model and pipeline stages and the workers (now {s.infer_cpu_bf16}); "
                        "on: the network in bf16 autocast on a CPU; auto: where the CPU has AVX512-BF16 or AMX")
    p.add_argument("--tta", choices=TTA_MODES, default=s.infer_tta,
                   help=f"INFER_TTA for the model and pipeline stages and the workers (now {s.infer_tta}); auto: the "
                        "checkpoint's own mode (the shipped model's flip4: four passes per image; the full-size "
                        "random network's off)")
    p.add_argument("--jobs", type=int, default=1,
                   help="system stage: the batch as this many jobs of consecutive images (default 1), sent one after "
                        "another by each of --uploaders clients")
    p.add_argument("--parts", type=int, default=1,
                   help="system stage: the batch as one job opened for parts, sent as this many parts of consecutive "
                        "images by --uploaders clients at once, then closed (default 1: sent whole)")
    p.add_argument("--uploaders", type=int, default=1,
                   help="system stage: clients uploading --jobs (or --parts) at once (default 1)")
    p.add_argument("--api-workers", type=int, default=0,
                   help="system stage: the API under gunicorn with this many processes of 4 threads, as "
                        "docker-compose.yml runs it (default 0: the API in a thread of this process)")
    p.add_argument("--standin-device", type=float, metavar="RATE",
                   help="replace the network in every stage by a stand-in device of RATE images/s that uses no CPU "
                        "and hands back the real network's probabilities on the bench's images (bench/standin.py): "
                        "how well the rest of the system keeps an off-CPU network busy, measured on a CPU")
    p.add_argument("--stages", default="model,pipeline,system", help="comma-separated subset of model,pipeline,system")
    p.add_argument("--quick", action="store_true", help="16 images, the shipped model: under a minute on the 2-core CPU")
    p.add_argument("--sweep-batches", metavar="B,B,...",
                   help="instead: the model stage alone at each of these forward batches (what INFER_BATCH_SIZE=auto is based on)")
    p.add_argument("--memory", action="store_true", help="memory run instead: worker RSS over --images (5,000), API RSS vs upload size")
    p.add_argument("--api-files", default="25,100,400", help="--memory: files per upload for the API probe (3000x2500 JPEGs)")
    p.add_argument("--cache", type=Path, default=s.home / "bench", help="where generated JPEGs are kept (default var/bench)")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
    return p


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def checkpoint_for(args, tmp: Path) -> tuple[Path, str]:
    if args.full:
        if args.full == "shipped":
            return (tp.full_size_checkpoint(tmp / "full-size.pt", weights="shipped"),
                    "full-size UNetConfig() at 512 carrying the shipped model's trained network")
        return tp.full_size_checkpoint(tmp / "full-size.pt"), "full-size UNetConfig() at 512, random weights"
    from model.checkpoint import DEFAULT_CHECKPOINT

    path = args.checkpoint or DEFAULT_CHECKPOINT
    return path, f"{path.name}"


def worker_env(args) -> dict[str, str]:
    """The workers' settings that the bench's flags set, the same for every system it starts (the
    system stage's and the memory run's)."""
    env = {"GPU_DECODE": args.gpu_decode, "GPU_DECODE_BATCH": args.gpu_decode_batch, "OVERLAYS": args.overlays,
           "ALLOCATOR": args.allocator, "JPEG_DECODE": args.jpeg_decode, "INFER_CPU_BF16": args.cpu_bf16,
           "INFER_TTA": args.tta, "CUDNN_BENCHMARK": args.cudnn_benchmark, "IO_PRIORITY": args.io_priority}
    if args.worker_concurrency:  # else the workers' own default (WORKER_CONCURRENCY=auto)
        env["WORKER_CONCURRENCY"] = str(args.worker_concurrency)
    return env


def run_memory(args, ckpt: Path, out: dict) -> int:
    n = args.images or 5000
    h, w = args.size or (1000, 800)
    paths = tp.bench_images(args.cache, n, h, w, unique=100, log=log)
    env = out["worker_env"] = worker_env(args)
    log(f"worker memory: {n} images of {h}x{w}, one worker, {args.threads} torch thread(s), "
        + ", ".join(f"{k}={v}" for k, v in env.items()))
    with tp.running_system(ckpt, workers=1, threads=args.threads, batch=args.batch, chunk=args.chunk,
                           io_threads=args.io_threads, broker=args.broker, extra_env=env) as system:
        worker = tp.worker_memory(system, paths, log=log)
    out["worker_memory"] = worker
    files = [int(v) for v in args.api_files.split(",") if v]
    big = tp.bench_images(args.cache, min(max(files), 200), 3000, 2500, log=log)
    log(f"API memory: uploads of {files} files of 3000x2500, API in its own process, no worker")
    with tp.running_system(ckpt, workers=0, threads=args.threads, batch=args.batch, chunk=args.chunk,
                           io_threads=args.io_threads, broker=args.broker, api_process=True) as system:
        api = tp.api_memory(system, big, files)
    out["api_memory"] = api
    print(f"\nWorker RSS over {worker['images']} images of {h}x{w} ({worker['seconds']} s, job {worker['status']}):")
    print(f"  start {worker['rss_start_mib']} MiB, at 10% {worker['rss_at_10pct_mib']} MiB, end {worker['rss_end_mib']} MiB, "
          f"max {worker['rss_max_mib']} MiB (max after 10%: {worker['rss_max_after_10pct_mib']} MiB)")
    print(f"  median RSS in each tenth of the run (MiB): {worker['rss_median_by_tenth_mib']}")
    print("\nAPI RSS while receiving one job (streamed upload):")
    print(f"  {'files':>6} {'upload MiB':>11} {'seconds':>8} {'RSS before':>11} {'RSS peak':>9}")
    for row in api:
        print(f"  {row['files']:>6} {row['upload_mib']:>11} {row['seconds']:>8} {row['rss_before_mib']:>11} {row['rss_peak_mib']:>9}")
    growth = worker["rss_end_mib"] - worker["rss_at_10pct_mib"]
    api_growth = api[-1]["rss_peak_mib"] - api[0]["rss_peak_mib"]
    print(f"bench memory: worker RSS {worker['rss_at_10pct_mib']} -> {worker['rss_end_mib']} MiB over {n} images "
          f"({growth:+.1f} MiB); API peak {api[0]['rss_peak_mib']} -> {api[-1]['rss_peak_mib']} MiB for "
          f"{api[0]['upload_mib']} -> {api[-1]['upload_mib']} MiB uploads ({api_growth:+.1f} MiB)")
    return 0


def run_sweep(args, ckpt: Path, out: dict, n: int, h: int, w: int) -> int:
    """The network alone at several forward batches, n images each (at least two batches)."""
    from model.inference import default_batch_size, wants_cpu_bf16

    try:
        batches = [int(b) for b in args.sweep_batches.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--sweep-batches takes positive integers, e.g. 1,2,4,16; got {args.sweep_batches!r}") from None
    if not batches or min(batches) < 1:
        raise SystemExit(f"--sweep-batches takes positive integers, e.g. 1,2,4,16; got {args.sweep_batches!r}")
    paths = tp.bench_images(args.cache, min(n, 8), h, w, log=log)
    rows = []
    for batch in batches:
        if args.compile:
            import torch._dynamo

            torch._dynamo.reset()  # a fresh compilation per batch, not torch's recompile limit
        segmenter = tp.load_segmenter(ckpt, batch, args.threads, args.device, compile_network=args.compile,
                                      cpu_bf16=wants_cpu_bf16(args.cpu_bf16), tta=args.tta,
                                      cudnn_benchmark=args.cudnn_benchmark == "on", fold_bn=FOLD_BN[args.fold_bn])
        frames = frames if rows else tp.frames_of(segmenter, paths, 8)  # the same frames at every batch
        r = tp.measure_model(segmenter, frames, max(n, 2 * batch))
        rows.append({"batch": batch, "images": r.images, "img_s": round(r.rate, 3), "cpu_ms_per_image": round(r.cpu_ms_per_image, 1)})
        log(f"batch {batch}: {r.rate:.3f} img/s")
    auto = default_batch_size(segmenter.network.config, segmenter.preprocessor.size, segmenter.cuda,  # compiled: passed through
                              segmenter.tta)
    out["sweep"], out["auto_batch"] = rows, auto
    best = max(rows, key=lambda r: r["img_s"])
    print(f"\ndevice:   {tp.device_name(segmenter)}\nmachine:  {out['machine']}\nmodel:    {out['model']}")
    if segmenter.cuda:
        print(f"config:   compile {args.compile}; cudnn.benchmark {args.cudnn_benchmark}; TTA {segmenter.tta}; "
              f"BatchNorm folded {segmenter.fold_bn} (--fold-bn {args.fold_bn})")
    print(f"\n{'batch':>6}{'images':>8}{'img/s':>9}{'CPU ms/img':>12}{'/ best':>8}")
    for r in rows:
        print(f"{r['batch']:>6}{r['images']:>8}{r['img_s']:>9.3f}{r['cpu_ms_per_image']:>12.0f}{r['img_s'] / best['img_s']:>8.2f}")
    print(f"bench sweep: best batch {best['batch']} ({best['img_s']:.3f} img/s); INFER_BATCH_SIZE=auto picks {auto} here")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bonedetect-bench-ckpt-"))
    try:
        return run(args, argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, argv, tmp: Path) -> int:
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if not stages <= {"model", "pipeline", "system"}:
        raise SystemExit(f"--stages: unknown stage(s) {sorted(stages - {'model', 'pipeline', 'system'})}")
    if (args.workers < 1 or (args.batch is not None and args.batch < 1) or args.chunk < 1 or args.io_threads < 1
            or args.jobs < 1 or args.parts < 1 or args.uploaders < 1 or args.api_workers < 0):
        raise SystemExit("--workers, --batch, --chunk, --io-threads, --jobs, --parts and --uploaders must be at least 1, "
                         "--api-workers 0 or more")
    if args.parts > 1 and args.jobs > 1:
        raise SystemExit("--parts sends one job in parts: not with --jobs")
    if args.fold_bn != "auto" and "system" in stages and not args.sweep_batches:
        raise SystemExit(f"--fold-bn {args.fold_bn}: workers fold as auto does; use it with --stages model,pipeline "
                         "or --sweep-batches")
    import torch

    from bonedetect.settings import Settings
    from worker.tasks import configure_process

    # this process runs the model and pipeline stages as each worker runs (worker.tasks.build_context)
    configure_process(dataclasses.replace(Settings.from_env(), allocator=args.allocator))
    if args.threads is None:
        args.threads = 1 if args.workers > 1 or args.pin_workers else torch.get_num_threads()
    ckpt, model_text = checkpoint_for(args, tmp)
    out: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "infer_tta": args.tta, "infer_cpu_bf16": args.cpu_bf16,  # as set; the table's config line says what ran
        "cudnn_benchmark": args.cudnn_benchmark, "fold_bn": args.fold_bn,
        "machine": machine(),
        "torch": torch.__version__,
        "model": model_text,
    }
    if args.memory:
        status = run_memory(args, ckpt, out)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return status

    n = args.images or (16 if args.quick else 100)
    h, w = args.size or (3000, 2500)
    if args.sweep_batches:
        return run_sweep(args, ckpt, out, n, h, w)
    paths = tp.bench_images(args.cache, n, h, w, log=log)
    worker_batch = args.batch  # None: the workers choose (INFER_BATCH_SIZE=auto), on their own device
    from model.inference import wants_cpu_bf16

    segmenter = tp.load_segmenter(ckpt, args.batch, args.threads, args.device, compile_network=args.compile,
                                  cpu_bf16=wants_cpu_bf16(args.cpu_bf16), tta=args.tta,
                                  cudnn_benchmark=args.cudnn_benchmark == "on", fold_bn=FOLD_BN[args.fold_bn])
    args.batch = segmenter.batch_size  # auto resolved here, for the model and pipeline stages and the table
    from worker.app import default_concurrency
    from worker.pipeline import pool_priority

    args.worker_concurrency = args.worker_concurrency or default_concurrency()  # auto, as the workers resolve it
    standin_env, worker_app = {}, "worker.app"
    if args.standin_device:
        from bench.standin import PLANES_ENV, RATE_ENV, SHARED_ENV, StandInDevice, save_reference

        planes = save_reference(segmenter, tp.frames_of(segmenter, paths, 8), tmp / "standin-planes.npy")
        segmenter = StandInDevice(segmenter, args.standin_device, np.load(planes))
        # the workers' stand-ins are one device between them, as a GPU host's worker processes share its GPU
        standin_env, worker_app = {RATE_ENV: str(args.standin_device), PLANES_ENV: str(planes),
                                   SHARED_ENV: str(tmp / "standin-device")}, "bench.standin"
        model_text += f", its network replaced by a stand-in device of {args.standin_device:g} img/s (bench/standin.py)"
        out["model"], out["standin_device"] = model_text, args.standin_device
    out["tta_served"] = segmenter.tta  # INFER_TTA resolved against the checkpoint (auto: its recommended mode)
    out["worker_concurrency"] = args.worker_concurrency
    # a GPU's device, or the stand-in for one: the workers share it, and the pool's work sets the rate
    gpu_like = segmenter.cuda or bool(args.standin_device)
    args.io_priority = out["io_priority"] = pool_priority(args.io_priority, gpu_like)  # auto, as the workers resolve it
    device = tp.device_name(segmenter)
    results: dict[str, tp.StageResult] = {}
    drift_warning = None
    if "model" in stages:
        n_model = max(n, 3 * args.batch)  # at least three forward batches
        # with other stages, half of the images before them and half after (tp.bracketed): a shared host's
        # speed moves by minutes, and the ratios should compare the network with the stages at one speed
        bracket = bool(stages & {"pipeline", "system"})
        if bracket:  # each half whole batches, at least two
            first = rest = args.batch * max(2, -(-n_model // (2 * args.batch)))
        else:
            first, rest = n_model, 0
        model_frames = tp.frames_of(segmenter, paths, 8)
        log(f"model: {first} images, batch {args.batch}, {args.threads} torch thread(s)"
            f"{f'; {rest} more after the other stages' if rest else ''}")
        results["model"] = tp.measure_model(segmenter, model_frames, first)
    if "pipeline" in stages:
        log(f"pipeline: {n} images in chunks of {args.chunk}, {args.worker_concurrency} at once, "
            f"{args.io_threads} decode/encode threads")
        reduced = args.jpeg_decode == "reduced"
        results["pipeline"] = tp.measure_pipeline(segmenter, paths, args.chunk, args.io_threads, args.gpu_decode,
                                                  overlays=args.overlays == "eager", reduced_jpeg=reduced,
                                                  concurrency=args.worker_concurrency,
                                                  gpu_decode_batch=args.gpu_decode_batch == "on",
                                                  io_priority=args.io_priority)
        costs = tp.step_costs(segmenter, paths, reduced_jpeg=reduced and args.overlays == "lazy")
        out["step_ms"] = {k: round(v, 1) for k, v in costs.items()}
    if "system" in stages and args.workers > 1 and (n % args.chunk or (n // args.chunk) % args.workers):
        log(f"note: {n} images in chunks of {args.chunk} do not split evenly over {args.workers} workers: "
            "the last chunk runs alone and the scaling looks worse than it is")
    if "system" in stages:
        kw = dict(threads=args.threads, batch=worker_batch, chunk=args.chunk, io_threads=args.io_threads,
                  broker=args.broker, extra_env={**worker_env(args), **standin_env},
                  pin_workers=args.pin_workers, app=worker_app, api_workers=args.api_workers)
        if args.workers > 1:
            log(f"system: one worker, {args.threads} torch thread(s), {args.broker}")
            with tp.running_system(ckpt, workers=1, **kw) as system:
                results["system-1"] = tp.measure_system(system, paths, "system, 1 worker", jobs=args.jobs,
                                                        uploaders=args.uploaders, parts=args.parts)
        log(f"system: {args.workers} worker(s), {args.threads} torch thread(s) each, {args.broker}")
        with tp.running_system(ckpt, workers=args.workers, **kw) as system:
            results["system"] = tp.measure_system(system, paths, f"system, {args.workers} worker(s)", jobs=args.jobs,
                                                  uploaders=args.uploaders, parts=args.parts)

    if "model" in stages and bracket:
        log(f"model: {rest} more images")
        results["model"], drift_warning = tp.bracketed(results["model"], tp.measure_model(segmenter, model_frames, rest))
        out["drift_warning"] = drift_warning

    by_step = results["pipeline"].notes.pop("cpu_ms_by_step", None) if "pipeline" in results else None
    for r in results.values():
        r.notes["load"] = r.notes.pop("load", None)  # keep it last
    model = results.get("model")
    # K CPU workers have K times the cores of one; K workers on a GPU (or the stand-in) share its one device
    scale = args.workers if "system" in results and not gpu_like else 1
    print()
    print(f"device:   {device}")
    print(f"machine:  {out['machine']}")
    print(f"model:    {model_text} ({ckpt})")
    chunks = -(-n // args.chunk)
    print(f"config:   {n} images of {h}x{w} JPEG; forward batch {args.batch}; chunk {args.chunk} ({chunks} chunks); torch threads {args.threads}"
          f" per worker; decode/encode threads {args.io_threads} at {args.io_priority} priority; workers {args.workers}"
          f" of {args.worker_concurrency} chunk(s) at once; "
          f"{f'1 job in {args.parts} parts' if args.parts > 1 else f'{args.jobs} job(s)'} by "
          f"{min(args.uploaders, max(args.jobs, args.parts))} uploader(s); API "
          f"{f'gunicorn x{args.api_workers}' if args.api_workers else 'in this process'}"
          f"{' (one core each)' if args.pin_workers else ''}; broker {args.broker}; "
          f"channels_last {segmenter.channels_last}; BatchNorm folded {segmenter.fold_bn}; compile {args.compile}; "
          f"{f'cudnn.benchmark {args.cudnn_benchmark}; ' if segmenter.cuda else ''}"
          f"{f'GPU decode {args.gpu_decode}, batched {args.gpu_decode_batch}; ' if segmenter.cuda else ''}overlays {args.overlays}; "
          f"JPEG decode {args.jpeg_decode}; allocator {args.allocator}; OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}; "
          f"CPU bf16 {segmenter.cpu_bf16}; TTA {segmenter.tta} (INFER_TTA={args.tta})")
    print()
    print(f"{'stage':<22}{'images':>7}{'seconds':>9}{'img/s':>9}{'/ model':>9}{'CPU ms/img':>11}{'model/this':>11}{'cores':>6}  notes")
    for key, r in results.items():
        ref = model.rate * (scale if key == "system" else 1) if model else None
        ratio = f"{r.rate / ref:.3f}" if ref else "-"
        cpu = r.cpu_ms_per_image
        cpu_ratio = f"{model.cpu_ms_per_image / cpu:.3f}" if model and cpu else "-"
        notes = ", ".join(f"{k}={v}" for k, v in r.notes.items())
        if r.failed:
            notes = f"FAILED {r.failed}; " + notes
        cores = r.cpu_seconds / r.seconds if r.cpu_seconds is not None and r.seconds > 0 else float("nan")
        print(f"{r.name:<22}{r.images:>7}{r.seconds:>9.1f}{r.rate:>9.2f}{ratio:>9}{cpu or float('nan'):>11.0f}{cpu_ratio:>11}{cores:>6.2f}  {notes}")
        out.setdefault("stages", {})[key] = {"images": r.images, "seconds": round(r.seconds, 2), "img_s": round(r.rate, 3),
                                              "cpu_ms_per_image": round(cpu, 1) if cpu else None, "cores": round(cores, 2),
                                              "failed": r.failed, **r.notes}
    print("(CPU ms/img: core-milliseconds per image of the stage's processes; model/this: the model's over this stage's,\n"
          " the share of the CPU work that is the network. cores: CPU seconds over wall seconds, the cores the stage got.\n"
          " steal_pct: the share of the machine's CPU time the hypervisor gave other guests during the stage (a VM's\n"
          " CPUs are shared: its wall-clock time grew with it, its CPU ms did not).\n"
          " load: 1-minute load average after the stage. On a machine others use, both img/s and CPU ms move with\n"
          " their load (OpenMP threads spin while a sibling waits for a core): compare stages only at a steady load\n"
          " and with little steal.)")
    if drift_warning:
        print(f"WARNING: {drift_warning}")
    if scale > 1:
        print(f"(system / model compares {args.workers} workers with {args.workers} x the one-thread model figure)")
    elif args.workers > 1 and "system" in results:
        print(f"(system / model compares {args.workers} workers sharing the one device with the device's own figure)")
    if by_step:
        r = results["pipeline"]
        other = (r.cpu_ms_per_image or 0.0) - sum(by_step.values())
        out["pipeline_cpu_ms_by_step"] = {**{k: round(v, 1) for k, v in by_step.items()}, "other": round(other, 1)}
        print("\nPipeline CPU by step, in the run (core-ms per image, the thread that ran each step):")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in by_step.items() if v >= 0.05) + f"; other {other:.1f}")
        print("  (forward: the calling thread only. other: the stage's CPU ms per image minus the steps: PyTorch's\n"
              "   and OpenCV's own threads (on a CPU, most of the network), waits that spin, hand-offs between threads)")
    if "step_ms" in out:
        net_ms = 1000.0 / model.rate * args.threads if model else None
        print("\nCPU cost per image, one thread, step by step (ms):")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in out["step_ms"].items()))
        worker_steps = {k: v for k, v in out["step_ms"].items() if args.overlays == "eager" or not k.startswith("overlay")}
        other = sum(worker_steps.values())
        if args.overlays == "lazy":
            print("  (overlay and overlay PNG run in the API on an overlay's first request, not in the worker)")
        if net_ms and not args.standin_device:
            print(f"  all the worker does but the network: {other:.0f} ms; the network: {net_ms:.0f} ms x thread "
                  f"(model stage, {args.threads} thread(s)); on a CPU-only machine system/model is at most "
                  f"{net_ms / (net_ms + other):.2f}")
    if "system-1" in results and "system" in results:
        s1, sk = results["system-1"].rate, results["system"].rate
        out["scaling"] = round(sk / s1, 3)
        print(f"\nscaling: 1 worker {s1:.2f} img/s, {args.workers} workers {sk:.2f} img/s: {sk / s1:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))

    def fmt(key):
        return f"{results[key].rate:.2f}" if key in results else "-"

    sysmodel = results["system"].rate / (model.rate * scale) if model and "system" in results else float("nan")
    print(f"bench: model={fmt('model')} pipeline={fmt('pipeline')} system={fmt('system')} img/s, system/model={sysmodel:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
