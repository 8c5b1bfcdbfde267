"""Checkpoints round-trip; the Segmenter returns what a manual forward pass gives."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import DEFAULT_CHECKPOINT, FORMAT, LoadedModel, load_checkpoint, save_checkpoint
from model.inference import Prediction, Segmenter
from model.network import AttentionUNet, UNetConfig
from model.postprocess import Postprocessor
from model.preprocess import Preprocessor

CONFIG = UNetConfig(filters=(4, 8, 16), dropout=0.3)


def tiny_network(seed=0) -> AttentionUNet:
    torch.manual_seed(seed)
    net = AttentionUNet(CONFIG)
    # non-trivial BatchNorm statistics, as after training
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def saved(tmp_path):
    net = tiny_network()
    path = save_checkpoint(
        tmp_path / "sub" / "tiny.pt",
        net,
        preprocessor=Preprocessor(32, mean=0.4, std=0.25),
        postprocessor=Postprocessor(0.45, 1e-3),
        version="tiny-1",
        label="random weights, test only",
        metrics={"val": {"dice": 0.5, "n": np.int64(3)}},
        extra={"train_config": {"lr": 1e-3, "filters": (4, 8, 16)}, "data_dir": Path("/data"), "torch": torch.__version__},
    )
    return path, net


def test_round_trip_restores_everything_and_identical_outputs(saved):
    path, net = saved
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and set(raw) == {
        "format", "version", "label", "network_config", "state_dict",
        "preprocessing", "postprocessing", "metrics", "extra", "created_at",
    }
    loaded = load_checkpoint(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.version == "tiny-1" and loaded.label == "random weights, test only"
    assert loaded.network.config == CONFIG and not loaded.network.training
    assert loaded.preprocessor.as_dict() == {"size": 32, "mean": 0.4, "std": 0.25}
    assert loaded.postprocessor.as_dict() == {"threshold": 0.45, "min_region_fraction": 1e-3, "fill_holes": True}
    assert loaded.metrics == {"val": {"dice": 0.5, "n": 3}}
    assert loaded.info["train_config"] == {"lr": 1e-3, "filters": [4, 8, 16]}
    assert loaded.info["data_dir"] == "/data" and loaded.info["format"] == FORMAT
    assert type(loaded.info["torch"]) is str  # torch.__version__ is a str subclass: stored as a plain str
    assert loaded.info["network_config"]["filters"] == [4, 8, 16] and "created_at" in loaded.info
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), net(x))


def test_half_checkpoint_is_smaller_and_close(saved, tmp_path):
    path, net = saved
    half = save_checkpoint(
        tmp_path / "half.pt", net, preprocessor=Preprocessor(32), postprocessor=Postprocessor(),
        version="tiny-1-half", label="test", half=True,
    )
    raw = torch.load(half, weights_only=True)["state_dict"]
    assert raw["head.weight"].dtype == torch.float16
    assert raw["encoder.0.body.1.num_batches_tracked"].dtype == torch.int64
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.network.parameters())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(loaded.network(x)), torch.sigmoid(net(x)), atol=5e-3, rtol=0)


def test_not_a_checkpoint_gives_a_clear_value_error(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a bonedetect checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="format None"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_unstorable_extra_is_rejected_at_save_time(tmp_path):
    kwargs = dict(preprocessor=Preprocessor(32), postprocessor=Postprocessor(), version="v", label="l")
    with pytest.raises(ValueError, match="extra.fn"):
        save_checkpoint(tmp_path / "a.pt", tiny_network(), extra={"fn": print}, **kwargs)
    with pytest.raises(ValueError, match="'format'"):
        save_checkpoint(tmp_path / "a.pt", tiny_network(), extra={"format": "x"}, **kwargs)
    with pytest.raises(ValueError, match="version"):
        save_checkpoint(tmp_path / "a.pt", tiny_network(), **{**kwargs, "version": ""})
    assert not any(tmp_path.iterdir())


def test_default_checkpoint_path_is_in_the_package():
    assert DEFAULT_CHECKPOINT.parent == Path(__file__).resolve().parents[2] / "model" / "checkpoints"
    assert DEFAULT_CHECKPOINT.name == "btxrd-256.pt"


def test_the_shipped_default_is_the_btxrd_model_with_its_terms_and_it_serves():
    """What the demo and every worker load unless told otherwise: trained on real radiographs,
    saying so and saying its non-commercial terms wherever it reports itself; the README matches it."""
    import hashlib

    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    # run 5's weights (btxrd-256-pi-20261128-bae53ab2) with thresholds chosen on validation for flip and flip4 TTA,
    # served with flip4 by default (INFER_TTA=auto)
    assert loaded.version == "btxrd-256-pi-20261128-bae53ab2-tta35"
    assert len(loaded.version + "+flip4-tta+jpeg-reduced") <= 64  # what a DICOM SEG keeps of a row's version
    assert [c["from_version"] for c in loaded.info["threshold_choices"]] == [
        "btxrd-256-pi-20261128-bae53ab2", "btxrd-256-pi-20261128-bae53ab2-flip-t0.35"]
    assert loaded.recommended_tta == "flip4"
    assert {m: p.threshold for m, p in loaded.postprocessors_tta.items()} == {"flip": 0.35, "flip4": 0.35}
    assert "non-commercial" in loaded.label and "not for clinical use" in loaded.label
    assert "CC BY-NC-ND 4.0" in loaded.info["data_license"]
    assert loaded.preprocessor.size == 256 and loaded.postprocessor.threshold == pytest.approx(0.25)
    assert loaded.info["training_config"]["split_file"].endswith("btxrd-256-grouped-v1.csv")
    assert loaded.info["training_config"]["dice_per_image"] is True
    assert loaded.info["init_from"]["version"] == "btxrd-256-warm-20261127-58db83b7"  # its parent
    assert loaded.info["init_from"]["init_from"]["version"] == "btxrd-256-strong16-r3-20261127-980bc391"
    assert loaded.info["init_from"]["init_from"]["init_from"]["version"] == "btxrd-256-strong16-r2-20261127-5d662618"
    assert (loaded.info["init_from"]["init_from"]["init_from"]["init_from"]["version"]
            == "btxrd-256-strong16-20261127-0697d0f8")  # the first run
    readme = (DEFAULT_CHECKPOINT.parent / "README.md").read_text()
    assert loaded.version in readme and hashlib.sha256(DEFAULT_CHECKPOINT.read_bytes()).hexdigest() in readme
    assert f"{sum(p.numel() for p in loaded.network.parameters()):,}" in readme
    image = np.random.default_rng(0).integers(0, 256, (300, 240)).astype(np.uint8)
    pred = Segmenter(loaded, device="cpu", batch_size=1).predict([image])[0]
    assert pred.mask.shape == (300, 240) and np.isfinite(pred.prob).all()
    served = Segmenter(loaded, device="cpu", flip_tta=loaded.recommended_tta)  # as INFER_TTA=auto serves it
    assert served.version.endswith("+flip4-tta") and served.postprocessor.threshold == pytest.approx(0.35)
    assert served.predict([image])[0].mask.shape == (300, 240)


# --- Segmenter -------------------------------------------------------------------


@pytest.fixture
def segmenter(saved):
    return Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=2)


def test_predictions_come_back_at_each_original_size(segmenter):
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (45, 30)).astype(np.uint8),
        rng.integers(0, 4096, (100, 250)).astype(np.uint16),
        rng.random((32, 32)).astype(np.float32),
        rng.integers(0, 256, (7, 3)).astype(np.uint8),
        rng.integers(0, 256, (1, 1)).astype(np.uint8),
    ]
    preds = segmenter.predict(images)  # 3 batches of 2, 2, 1
    assert len(preds) == len(images)
    for image, pred in zip(images, preds):
        assert isinstance(pred, Prediction)
        assert pred.prob.shape == pred.mask.shape == image.shape
        assert pred.prob.dtype == np.float32 and pred.mask.dtype == np.uint8
        assert 0.0 <= pred.prob.min() and pred.prob.max() <= 1.0
        assert set(np.unique(pred.mask)) <= {0, 1}
    assert segmenter.predict([]) == []


def test_segmenter_prob_equals_a_manual_forward_pass(saved, segmenter):
    path, _ = saved
    image = np.random.default_rng(1).integers(0, 256, (70, 41)).astype(np.uint8)
    pred = segmenter.predict([image])[0]
    loaded = load_checkpoint(path)
    frame, geometry = loaded.preprocessor(image)
    with torch.no_grad():
        logits = loaded.network(torch.from_numpy(frame)[None, None])
    prob = geometry.restore(torch.sigmoid(logits)[0, 0].numpy())
    np.testing.assert_allclose(pred.prob, prob, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pred.mask, loaded.postprocessor(prob))


def test_segmenter_serves_a_folded_copy_in_float32_and_leaves_the_checkpoint_network_alone(saved):
    loaded = load_checkpoint(saved[0])
    keys = set(loaded.network.state_dict())
    folded = Segmenter(loaded, device="cpu", batch_size=2)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.network.modules())
    assert set(loaded.network.state_dict()) == keys  # still savable as the checkpoint's network
    as_trained = Segmenter(loaded, device="cpu", batch_size=2, fold_bn=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in as_trained.network.modules())
    assert folded.fold_bn and not as_trained.fold_bn
    # under bf16 the folded weights round differently: served as trained unless asked
    bf16 = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=2, cpu_bf16=True)
    assert not bf16.fold_bn and any(isinstance(m, torch.nn.BatchNorm2d) for m in bf16.network.modules())
    assert Segmenter(load_checkpoint(saved[0]), device="cpu", cpu_bf16=True, fold_bn=True).fold_bn
    images = [np.random.default_rng(s).integers(0, 256, (50 + 7 * s, 41)).astype(np.uint8) for s in range(3)]
    for a, b in zip(folded.predict(images), as_trained.predict(images)):
        np.testing.assert_allclose(a.prob, b.prob, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_batching_does_not_change_results(saved):
    images = [np.random.default_rng(s).integers(0, 256, (40 + s, 33)).astype(np.uint8) for s in range(3)]
    one = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=1).predict(images)
    three = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=3).predict(images)
    for a, b in zip(one, three):
        np.testing.assert_allclose(a.prob, b.prob, atol=1e-5)


def test_predict_batch_tensor_gives_probabilities(segmenter):
    probs = segmenter.predict_batch_tensor(torch.randn(3, 1, 32, 32))
    assert probs.shape == (3, 1, 32, 32) and probs.dtype == torch.float32
    assert probs.min() >= 0 and probs.max() <= 1
    segmenter.warmup()


def test_segmenter_rejects_bad_settings(saved):
    loaded = load_checkpoint(saved[0])
    with pytest.raises(ValueError, match="batch_size"):
        Segmenter(loaded, device="cpu", batch_size=0)
    bad = dataclasses.replace(loaded, preprocessor=Preprocessor(30))
    with pytest.raises(ValueError, match="30"):
        Segmenter(bad, device="cpu")


def test_automatic_batch_is_small_on_a_cpu_and_large_on_a_gpu():
    """INFER_BATCH_SIZE=auto: the three networks this project runs get the CPU
    batch that measured fastest for them (docs/benchmarks.md), a GPU gets 16."""
    from model.inference import default_batch_size
    from model.network import UNetConfig

    full, shipped, demo = UNetConfig(), UNetConfig(filters=(16, 32, 64, 128, 256)), UNetConfig(filters=(8, 16, 32, 64, 128))
    assert [default_batch_size(c, s, cuda=False) for c, s in ((full, 512), (shipped, 256), (demo, 192))] == [1, 2, 4]
    assert default_batch_size(shipped, 256, cuda=False, flip_tta=True) == 1, "flip TTA doubles each forward pass"
    assert default_batch_size(demo, 32, cuda=False) == 16, "never above the GPU batch"
    assert default_batch_size(full, 512, cuda=True) == 16


def test_segmenter_and_settings_take_automatic_or_explicit_batches(saved):
    from bonedetect.local import settings_env
    from bonedetect.settings import Settings
    from worker.tasks import warm_segmenter

    loaded = load_checkpoint(saved[0])  # 32 px: the automatic CPU batch is the cap
    assert Segmenter(loaded, device="cpu").batch_size == 16 and Segmenter(loaded, device="cpu", batch_size=3).batch_size == 3
    assert Settings.from_env({}).infer_batch_size is None and Settings.from_env({"INFER_BATCH_SIZE": " Auto "}).infer_batch_size is None
    assert Settings.from_env({"INFER_BATCH_SIZE": "8"}).infer_batch_size == 8
    assert settings_env(Settings.from_env({}))["INFER_BATCH_SIZE"] == "auto"
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="INFER_BATCH_SIZE"):
            Settings.from_env({"INFER_BATCH_SIZE": bad})
    assert warm_segmenter(loaded, Settings.from_env({"INFER_BATCH_SIZE": "5"}), cuda=False).batch_size == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(saved):
    images = [np.random.default_rng(s).integers(0, 256, (300, 200 + 50 * s)).astype(np.uint8) for s in range(3)]
    cpu = Segmenter(load_checkpoint(saved[0]), device="cpu").predict(images)
    gpu = Segmenter(load_checkpoint(saved[0]), device="cuda").predict(images)
    for a, b in zip(cpu, gpu):
        assert np.abs(a.prob - b.prob).max() < 0.03


def test_cudnn_benchmark_is_a_setting_and_left_alone_off_cuda(saved, monkeypatch):
    """CUDNN_BENCHMARK (default on) reaches the worker's Segmenter; a CPU Segmenter does not touch cuDNN's flag."""
    from bonedetect.local import settings_env
    from bonedetect.settings import Settings
    from worker.tasks import warm_segmenter

    assert Settings.from_env({}).cudnn_benchmark == "on"
    assert Settings.from_env({"CUDNN_BENCHMARK": "Off"}).cudnn_benchmark == "off"
    assert settings_env(Settings.from_env({"CUDNN_BENCHMARK": "off"}))["CUDNN_BENCHMARK"] == "off"
    with pytest.raises(ValueError, match="CUDNN_BENCHMARK"):
        Settings.from_env({"CUDNN_BENCHMARK": "fast"})
    import model.inference as inference

    seen = []

    class Recording(inference.Segmenter):
        def __init__(self, loaded, **kwargs):
            seen.append(kwargs["cudnn_benchmark"])
            super().__init__(loaded, **kwargs)

    monkeypatch.setattr(inference, "Segmenter", Recording)
    for value in ("on", "off"):
        warm_segmenter(load_checkpoint(saved[0]), Settings.from_env({"CUDNN_BENCHMARK": value}), cuda=False)
    assert seen == [True, False]
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    Segmenter(load_checkpoint(saved[0]), device="cpu", cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_submit_queues_batches_and_gives_forwards_numbers(saved):
    """Batches launched back to back through pinned memory come back as the CPU computes them (bf16 on the GPU),
    each its own, with a compiled network's padding too."""
    frames = [np.random.default_rng(s).normal(size=(32, 32)).astype(np.float32) for s in range(5)]
    cpu = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=2).forward(frames)
    for compiled in (False, True):
        gpu = Segmenter(load_checkpoint(saved[0]), device="cuda", batch_size=2, compile_network=compiled)
        launched = [gpu.submit(frames[i : i + 2]) for i in range(0, 5, 2)]  # all three queued before any is read
        got = np.concatenate([p.result() for p in launched])
        assert got.shape == (5, 32, 32) and np.abs(got - cpu).max() < 0.03
        np.testing.assert_allclose(gpu.forward(frames), got, rtol=0, atol=1e-3)  # a mixed-up buffer: ~0.1 off


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_segmenter_lets_cudnn_time_its_algorithms(saved, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    Segmenter(load_checkpoint(saved[0]), device="cuda")
    assert torch.backends.cudnn.benchmark is True
    Segmenter(load_checkpoint(saved[0]), device="cuda", cudnn_benchmark=False)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serves_the_network_as_trained_unless_asked_to_fold(saved):
    """bf16 always on CUDA: the BatchNorms stay unless fold_bn=True (the GPU script's FOLD_AB measures both)."""
    assert not Segmenter(load_checkpoint(saved[0]), device="cuda").fold_bn
    assert Segmenter(load_checkpoint(saved[0]), device="cuda", fold_bn=True).fold_bn


@pytest.mark.parametrize("tta", ["off", "flip4"])
def test_compiled_network_pads_partial_batches_and_gives_the_same_probabilities(saved, tta):
    """TORCH_COMPILE: one static shape (the last, partial batch is padded), same numbers (CPU inductor here),
    with and without test-time augmentation (flip4 is what the shipped model is served with)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    images = [np.random.default_rng(s).integers(0, 256, (90, 60 + 10 * s)).astype(np.uint8) for s in range(5)]
    plain = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=2, flip_tta=tta)
    compiled = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=2, compile_network=True, flip_tta=tta)
    seen = []
    forward = compiled.predict_batch_tensor
    compiled.predict_batch_tensor = lambda x: (seen.append(tuple(x.shape)), forward(x))[1]
    for a, b in zip(plain.predict(images), compiled.predict(images)):  # batches of 2, 2, 1
        np.testing.assert_allclose(a.prob, b.prob, rtol=0, atol=1e-4)
        assert np.array_equal(a.mask, b.mask) or np.abs(a.prob - 0.5).min() < 1e-4
    assert len(seen) == 3 and set(seen) == {(2, 1, 32, 32)}, "the partial batch went in padded"
    assert counters["stats"]["unique_graphs"] == 1, "compiled once: the padded batch has the full batches' strides"


def test_flip_tta_averages_the_mirrored_pass_and_says_so_in_the_version(saved):
    loaded = load_checkpoint(saved[0])
    plain = Segmenter(loaded, device="cpu", batch_size=3)
    tta = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=3, flip_tta=True)
    assert tta.version == plain.version + "+flip-tta"
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32))
    want = (plain.predict_batch_tensor(x) + plain.predict_batch_tensor(x.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(tta.predict_batch_tensor(x), want, rtol=0, atol=1e-6)
    image = np.random.default_rng(1).integers(0, 256, (50, 70)).astype(np.uint8)
    mirrored = tta.predict([image[:, ::-1].copy()])[0].prob[:, ::-1]
    assert np.abs(tta.predict([image])[0].prob - mirrored).max() < 0.02, "a mirrored image gets a mirrored map"


def test_cpu_bf16_runs_the_network_under_autocast_and_says_so_in_the_version(saved, monkeypatch):
    from bonedetect.settings import Settings
    from model.inference import wants_cpu_bf16
    from worker.tasks import warm_segmenter

    plain = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=3)
    bf16 = Segmenter(load_checkpoint(saved[0]), device="cpu", batch_size=3, cpu_bf16=True)
    assert bf16.version == plain.version + "+cpu-bf16" and not plain.cpu_bf16
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # the reference: autocast by hand
        want = torch.sigmoid(bf16.network(x.contiguous(memory_format=torch.channels_last)).float())
    got, fp32 = bf16.predict_batch_tensor(x), plain.predict_batch_tensor(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert 0 < (got - fp32).abs().max() < 0.05, "bf16, not fp32, and close to it"
    # INFER_CPU_BF16: off by default; auto follows the CPU's flags; the worker's Segmenter gets it
    assert Settings.from_env({}).infer_cpu_bf16 == "off"
    with pytest.raises(ValueError, match="INFER_CPU_BF16"):
        Settings.from_env({"INFER_CPU_BF16": "yes"})
    assert wants_cpu_bf16("on") and not wants_cpu_bf16("off")
    monkeypatch.setattr("model.inference.cpu_has_native_bf16", lambda: False)
    assert not wants_cpu_bf16("auto")
    monkeypatch.setattr("model.inference.cpu_has_native_bf16", lambda: True)
    assert wants_cpu_bf16("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the worker's Segmenter picks its device itself
    served = warm_segmenter(load_checkpoint(saved[0]), Settings.from_env({"INFER_CPU_BF16": "on", "TORCH_COMPILE": "off"}),
                            cuda=False)
    assert served.cpu_bf16 and served.version.endswith("+cpu-bf16")


def test_worker_serves_uncompiled_when_compiling_fails_under_auto_only(saved, monkeypatch):
    """TORCH_COMPILE=auto on a GPU host without a C compiler: log and serve; =on: fail loudly."""
    from bonedetect.settings import Settings
    from worker.tasks import warm_segmenter

    real = Segmenter.predict_batch_tensor

    def no_compiler(self, x):
        if self.compiled:
            raise RuntimeError("Failed to find C compiler")
        return real(self, x)

    monkeypatch.setattr(Segmenter, "predict_batch_tensor", no_compiler)
    loaded = load_checkpoint(saved[0])
    served = warm_segmenter(loaded, Settings.from_env({"TORCH_COMPILE": "auto"}), cuda=True)
    assert not served.compiled and served.predict([np.zeros((40, 40), np.uint8)])[0].mask.shape == (40, 40)
    with pytest.raises(RuntimeError, match="C compiler"):
        warm_segmenter(loaded, Settings.from_env({"TORCH_COMPILE": "on"}), cuda=True)
    assert not warm_segmenter(loaded, Settings.from_env({}), cuda=False).compiled, "auto: no compiling on the CPU"


def test_a_worker_process_runs_opencv_on_one_thread_unless_told_otherwise():
    """worker.tasks.configure_process: the pipeline's I/O threads are the parallelism, so OpenCV's own
    pool stays at one thread (OPENCV_THREADS; 0 keeps OpenCV's default)."""
    import cv2

    from bonedetect.settings import Settings
    from worker.tasks import configure_process

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        configure_process(Settings.from_env({"ALLOCATOR": "system"}))
        assert cv2.getNumThreads() == 1
        cv2.setNumThreads(2)
        configure_process(Settings.from_env({"ALLOCATOR": "system", "OPENCV_THREADS": "0"}))
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
