"""`python -m bench` works end to end on a handful of tiny images: the model
and pipeline stages in this process, the system stage through the real API,
the embedded SQLite broker and a real worker process, and the memory probes.
Not a timed test: the numbers are the benchmark's business (docs/benchmarks.md)."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
import pytest

from bench import throughput as tp
from bench.__main__ import main
from model.checkpoint import SYNTHETIC_CHECKPOINT, load_checkpoint

LAST_LINE = re.compile(r"^bench: model=(\S+) pipeline=(\S+) system=(\S+) img/s, system/model=(\S+)$")


@pytest.fixture(autouse=True)
def _threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # main() sets it for its stages


def test_bench_images_are_cached_jpegs_of_the_asked_size(tmp_path):
    paths = tp.bench_images(tmp_path, 5, 90, 70, unique=3)
    assert [p.name for p in paths] == ["img-0000.jpg", "img-0001.jpg", "img-0002.jpg", "img-0000.jpg", "img-0001.jpg"]
    from worker.decode import decode_image

    image = decode_image(paths[1].read_bytes())
    assert image.format == "JPEG" and image.pixels.shape == (90, 70)
    before = paths[0].stat().st_mtime_ns
    assert tp.bench_images(tmp_path, 2, 90, 70) == paths[:2] and paths[0].stat().st_mtime_ns == before  # not made again


def test_model_and_pipeline_stages_and_step_costs(tmp_path):
    paths = tp.bench_images(tmp_path, 5, 120, 100)
    segmenter = tp.load_segmenter(SYNTHETIC_CHECKPOINT, batch=2, threads=1, device="cpu")
    model = tp.measure_model(segmenter, tp.frames_of(segmenter, paths, 3), 5)
    assert model.name == "model" and model.images == 5 and model.rate > 0
    assert 0.0 <= model.notes["steal_pct"] <= 100.0  # Linux: /proc/stat has the hypervisor's share
    pipeline = tp.measure_pipeline(segmenter, paths, chunk=3, threads=2, gpu_decode="auto")
    assert pipeline.images == 5 and pipeline.failed == 0 and pipeline.rate > 0
    assert pipeline.notes["decoder"] == "decode_image"  # no GPU here: the CPU decoder
    costs = tp.step_costs(segmenter, paths, k=2)
    assert set(costs) >= {"decode", "preprocess", "postprocess", "overlay PNG"} and all(v >= 0 for v in costs.values())


def test_steal_is_the_hypervisors_share_of_all_cpu_ticks_in_between(monkeypatch):
    monkeypatch.setattr(tp, "host_ticks", lambda: (60, 2000))
    assert tp.steal_percent((10, 1000)) == 5.0  # 50 of 1,000 ticks in between were stolen
    assert tp.steal_percent(None) is None and tp.steal_percent((60, 2000)) is None  # no reading, no time passed


def test_full_size_checkpoint_is_the_thesis_network_marking_a_tumor_sized_area(tmp_path):
    loaded = load_checkpoint(tp.full_size_checkpoint(tmp_path / "full.pt"))
    assert loaded.network.config.filters == (32, 64, 128, 256, 512) and loaded.preprocessor.size == 512
    assert sum(p.numel() for p in loaded.network.parameters()) == 7_850_713
    import cv2
    import torch

    pixels = cv2.imdecode(np.frombuffer(tp.radiograph_jpeg(5, 512, 512), np.uint8), cv2.IMREAD_GRAYSCALE)
    frame, _ = loaded.preprocessor(pixels)  # another image than the one the bias was set on
    with torch.inference_mode():
        marked = (torch.sigmoid(loaded.network(torch.from_numpy(frame)[None, None])) > 0.5).float().mean().item()
    assert 0.001 < marked < 0.2


def _randomised(network):
    """Random BatchNorm statistics and affine parameters, so that a channel put in the wrong place shows."""
    import torch

    g = torch.Generator().manual_seed(3)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=g))
            module.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return network.eval()


def test_a_widened_network_computes_what_the_narrow_one_does():
    import torch

    from model.network import AttentionUNet, UNetConfig

    torch.manual_seed(0)
    narrow = _randomised(AttentionUNet(UNetConfig(filters=(4, 8, 16), dropout=0.2)))
    wide = tp.widen_network(narrow, UNetConfig(filters=(8, 12, 32), dropout=0.2))
    assert wide.config.filters == (8, 12, 32) and not wide.training
    x = torch.randn(2, 1, 32, 24)
    with torch.inference_mode():
        expected, got = narrow(x), wide(x)
    assert expected.abs().max() > 0.1  # not a network of zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot widen"):
        tp.widen_network(narrow, UNetConfig(filters=(8, 16, 32, 64)))
    with pytest.raises(ValueError, match="cannot widen"):
        tp.widen_network(narrow, UNetConfig(filters=(2, 8, 16)))


def test_full_size_checkpoint_with_shipped_weights_is_the_thesis_network_computing_the_shipped_one(tmp_path):
    import cv2
    import torch

    from model.checkpoint import DEFAULT_CHECKPOINT

    loaded = load_checkpoint(tp.full_size_checkpoint(tmp_path / "full.pt", weights="shipped"))
    shipped = load_checkpoint(DEFAULT_CHECKPOINT)
    assert loaded.network.config.filters == (32, 64, 128, 256, 512) and loaded.preprocessor.size == 512
    assert sum(p.numel() for p in loaded.network.parameters()) == 7_850_713
    assert loaded.postprocessor.threshold == shipped.postprocessor.threshold and loaded.recommended_tta == "off"
    pixels = cv2.imdecode(np.frombuffer(tp.radiograph_jpeg(5, 1200, 1000), np.uint8), cv2.IMREAD_GRAYSCALE)
    frame, _ = loaded.preprocessor(pixels)
    with torch.inference_mode():
        x = torch.from_numpy(frame)[None, None]
        got, expected = loaded.network(x), shipped.network(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    mask = loaded.postprocessor(torch.sigmoid(got)[0, 0].numpy())
    regions = cv2.connectedComponents(mask)[0] - 1
    assert 0.001 < mask.mean() < 0.5 and 1 <= regions <= 20  # a trained network's few solid regions, not specks
    with pytest.raises(ValueError, match="weights"):
        tp.full_size_checkpoint(tmp_path / "x.pt", weights="trained")


def test_full_takes_its_weights_and_parses_as_before_without():
    from bench.__main__ import parser

    p = parser()
    assert p.parse_args(["--full", "--images", "200"]).full == "random" and p.parse_args([]).full is None
    assert p.parse_args(["--full", "shipped", "--images", "5"]).full == "shipped"
    for bad in (["--full", "trained"], ["--full", "--checkpoint", "x.pt"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_quick_command_prints_the_table_and_the_summary_line(tmp_path, capsys):
    status = main(["--images", "4", "--size", "120x100", "--batch", "2", "--chunk", "2", "--threads", "1",
                   "--io-threads", "2", "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert status == 0
    lines = out.strip().splitlines()
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    model, pipeline, system, ratio = (float(v) for v in match.groups())
    assert model > 0 and pipeline > 0 and system > 0
    assert ratio == pytest.approx(system / model, rel=0.02)
    system_row = next(line for line in lines if line.startswith("system, 1 worker"))
    assert "status=done" in system_row and "FAILED" not in system_row  # every image went through the real worker
    assert re.search(r"steal_pct=\d+\.\d", system_row)
    model_row = next(line for line in lines if line.startswith("model "))
    # 4 images in batches of 2: two batches before the other stages, two after (tp.bracketed)
    assert re.match(r"model\s+8\s", model_row) and re.search(r"before_img_s=[\d.]+, after_img_s=[\d.]+, drift_pct=-?[\d.]+", model_row)
    assert "device:   CPU" in out and "forward batch 2; chunk 2 (2 chunks); torch threads 1" in out


def test_batch_sweep_times_each_batch_and_names_the_automatic_choice(tmp_path, capsys):
    import json

    report = tmp_path / "sweep.json"
    status = main(["--sweep-batches", "1,3", "--images", "3", "--size", "120x100", "--threads", "1",
                   "--cache", str(tmp_path / "cache"), "--json", str(report)])
    out = capsys.readouterr().out
    assert status == 0
    rows = json.loads(report.read_text())["sweep"]
    assert [(r["batch"], r["images"]) for r in rows] == [(1, 3), (3, 6)]  # at least two forward passes each
    assert all(r["img_s"] > 0 for r in rows)
    assert re.search(r"^bench sweep: best batch [13] \(.* img/s\); INFER_BATCH_SIZE=auto picks 1 here$", out, re.M), out  # the shipped BTXRD-256 network, served flip4: 4 passes
    with pytest.raises(SystemExit, match="positive integers"):
        main(["--sweep-batches", "0,2", "--cache", str(tmp_path / "cache")])


def test_the_network_folded_or_not_is_measured_apart_from_what_workers_serve(tmp_path, capsys):
    import json

    from bench.throughput import load_segmenter
    from model.checkpoint import DEFAULT_CHECKPOINT

    def batchnorms(segmenter):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in segmenter.network.modules())

    assert batchnorms(load_segmenter(DEFAULT_CHECKPOINT, 1, 1)) == 0
    assert batchnorms(load_segmenter(DEFAULT_CHECKPOINT, 1, 1, fold_bn=False)) > 0
    report = tmp_path / "off.json"
    status = main(["--fold-bn", "off", "--stages", "model", "--images", "2", "--size", "120x100", "--batch", "1",
                   "--threads", "1", "--tta", "off", "--cache", str(tmp_path / "cache"), "--json", str(report)])
    assert status == 0 and json.loads(report.read_text())["fold_bn"] == "off"
    assert "BatchNorm folded False" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="workers fold as auto does"):
        main(["--fold-bn", "off", "--stages", "model,system", "--cache", str(tmp_path / "cache")])


def test_memory_probes_report_worker_and_api_rss(tmp_path, capsys):
    status = main(["--memory", "--images", "6", "--size", "96x80", "--api-files", "1,3", "--batch", "2", "--chunk", "3",
                   "--threads", "1", "--io-priority", "normal", "--jpeg-decode", "full", "--cache", str(tmp_path / "cache"),
                   "--json", str(tmp_path / "memory.json")])
    out = capsys.readouterr().out
    assert status == 0
    assert re.search(r"Worker RSS over 6 images of 96x80 \(\S+ s, job done\)", out)
    last = out.strip().splitlines()[-1]
    assert re.match(r"bench memory: worker RSS \S+ -> \S+ MiB over 6 images .*API peak \S+ -> \S+ MiB", last), last
    # the worker measured is configured by the same flags as the system stage's (it ignored all but two of them)
    env = json.loads((tmp_path / "memory.json").read_text())["worker_env"]
    assert env["IO_PRIORITY"] == "normal" and env["JPEG_DECODE"] == "full", env


def test_a_stand_in_device_queues_batches_at_its_rate_and_hands_back_the_real_networks_planes():
    """bench/standin.py: submit returns at once, the batch is ready when a device of that rate would be done
    with it and everything queued before it, and the probabilities are the real network's, in turn."""
    import time

    from bench.standin import StandInDevice, reference_planes

    segmenter = tp.load_segmenter(SYNTHETIC_CHECKPOINT, batch=2, threads=1, device="cpu")
    rng = np.random.default_rng(0)
    size = segmenter.preprocessor.size
    frames = [rng.normal(size=(size, size)).astype(np.float32) for _ in range(3)]
    planes = reference_planes(segmenter, frames)
    np.testing.assert_array_equal(planes, segmenter.forward(frames))
    device = StandInDevice(segmenter, rate=5.0, planes=planes)  # 200 ms per image
    assert device.version == segmenter.version + "+stand-in" and device.batch_size == 2

    start = time.perf_counter()
    first, second = device.submit(frames[:2]), device.submit(frames[:1])
    assert time.perf_counter() - start < 0.2, "submit queues the batch and returns"
    assert not first.ready and not second.ready
    got = first.result()
    assert 0.39 <= time.perf_counter() - start  # two images: 400 ms
    np.testing.assert_array_equal(got, planes[:2])
    np.testing.assert_array_equal(second.result(), planes[2:3])  # the next plane in turn
    assert 0.59 <= time.perf_counter() - start  # queued behind the first: 600 ms in all
    assert first.ready and second.ready
    np.testing.assert_array_equal(device.forward(frames[:3]), planes[[0, 1, 2]])  # the turn wraps around
    with pytest.raises(ValueError, match="1 to 2 frames"):
        device.submit(frames)
    with pytest.raises(ValueError, match="positive rate"):
        StandInDevice(segmenter, 0, planes)


def test_stand_ins_given_one_file_are_one_device_between_them(tmp_path):
    """BENCH_STANDIN_SHARED: the stand-ins of several worker processes (here two of this one, each with its
    own handle on the file) queue behind each other's batches, as worker processes share a host's GPU."""
    import time

    from bench.standin import StandInDevice

    segmenter = tp.load_segmenter(SYNTHETIC_CHECKPOINT, batch=2, threads=1, device="cpu")
    size = segmenter.preprocessor.size
    planes = np.zeros((2, size, size), np.float32)
    frames = list(planes)
    one, other = (StandInDevice(segmenter, 10.0, planes, shared=tmp_path / "device") for _ in range(2))
    alone = StandInDevice(segmenter, 10.0, planes)  # its own device
    start = time.monotonic()
    batches = [one.submit(frames), other.submit(frames), alone.submit(frames)]  # 200 ms each
    batches[2].result()
    assert time.monotonic() - start < 0.39, "a device of its own waits for no one"
    batches[1].result()
    assert time.monotonic() - start >= 0.39, "the second process's batch waited for the first's"
    assert batches[0].ready


def test_bench_with_a_stand_in_device_two_chunks_at_once_and_jobs_uploaded_at_once_runs_every_stage(tmp_path, capsys):
    """--standin-device RATE in every stage (the workers through bench.standin as their Celery app),
    --worker-concurrency 2 for the pipeline stage and the workers, and the system stage's batch as two
    jobs uploaded at once by two clients to the API under gunicorn: every image of both jobs done, and the model stage
    at the stand-in's rate."""
    import json

    status = main(["--images", "6", "--size", "120x100", "--batch", "2", "--chunk", "2", "--threads", "1",
                   "--io-threads", "2", "--standin-device", "40", "--worker-concurrency", "2", "--jobs", "2",
                   "--uploaders", "2", "--api-workers", "2", "--checkpoint", str(SYNTHETIC_CHECKPOINT), "--cache", str(tmp_path / "cache"),
                   "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert status == 0
    assert "stand-in device of 40 img/s" in out and "workers 1 of 2 chunk(s) at once" in out
    assert "2 job(s) by 2 uploader(s); API gunicorn x2" in out
    system_row = next(line for line in out.splitlines() if line.startswith("system, 1 worker"))
    assert "jobs=2, uploaders=2," in system_row and "status=done," in system_row and "FAILED" not in system_row
    assert re.search(r"chunks=4, ", system_row), system_row  # two jobs of 3 images, each in chunks of 2 and 1
    assert re.search(r"api_cpu_s=\d", system_row), system_row
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["standin_device"] == 40 and result["worker_concurrency"] == 2
    assert 20 < result["stages"]["model"]["img_s"] <= 40.5  # never faster than the device
    assert result["stages"]["pipeline"]["failed"] == 0


def test_bench_sends_one_job_in_parts(tmp_path, capsys):
    """--parts 3 --uploaders 2: the system stage's batch as one job opened for parts, three parts sent
    by two clients at once, then closed; every image done, one job."""
    status = main(["--images", "6", "--size", "120x100", "--batch", "2", "--chunk", "2", "--threads", "1",
                   "--io-threads", "2", "--standin-device", "40", "--stages", "model,system", "--parts", "3",
                   "--uploaders", "2", "--checkpoint", str(SYNTHETIC_CHECKPOINT), "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert status == 0
    assert "1 job in 3 parts by 2 uploader(s)" in out
    system_row = next(line for line in out.splitlines() if line.startswith("system, 1 worker"))
    assert "parts=3, uploaders=2," in system_row and "status=done," in system_row and "FAILED" not in system_row
    assert re.search(r"chunks=3, ", system_row), system_row  # three parts of 2 images, a chunk each
    with pytest.raises(SystemExit, match="not with --jobs"):
        main(["--parts", "2", "--jobs", "2", "--stages", "system"])


def test_the_model_figure_brackets_the_other_stages_and_warns_when_the_machine_changed_speed():
    """The network alone measured before and after the other stages counts as one figure: all images over
    all seconds and CPU; the notes give both rates and how far apart they are, and a change of more than
    DRIFT_WARN_PCT comes with a warning that names its direction."""
    before = tp.StageResult("model", 100, 50.0, notes={"steal_pct": 1.0, "load": 1.5}, cpu_seconds=90.0)
    after = tp.StageResult("model", 100, 40.0, notes={"steal_pct": 0.0, "load": 1.9}, cpu_seconds=80.0)
    result, warning = tp.bracketed(before, after)
    assert (result.name, result.images, result.seconds, result.cpu_seconds) == ("model", 200, 90.0, 170.0)
    assert result.rate == pytest.approx(200 / 90)
    assert result.notes["before_img_s"] == 2.0 and result.notes["after_img_s"] == 2.5
    assert result.notes["drift_pct"] == pytest.approx(22.2, abs=0.05)  # 100 * (2.5 - 2.0) / 2.25
    assert result.notes["steal_pct"] == pytest.approx(0.6, abs=0.05)  # 1% for 50 s, 0% for 40 s
    assert result.notes["load"] == 1.9
    assert warning and "22% faster after the other stages" in warning
    steady, warning = tp.bracketed(before, tp.StageResult("model", 50, 26.0, cpu_seconds=45.0))
    assert steady.notes["drift_pct"] == pytest.approx(-3.9, abs=0.05) and warning is None
    assert steady.notes["steal_pct"] is None  # unknown for one of the two
    _, warning = tp.bracketed(before, tp.StageResult("model", 100, 65.0))
    assert warning and "slower" in warning
