"""training.evaluate: Table 4.1 metrics pooled and per image, breakdowns, the report."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.inference import Segmenter
from model.metrics import MetricAccumulator
from training.btxrd import load_image, load_mask, read_btxrd
from training.evaluate import (
    NO_LESION,
    THESIS,
    ImageResult,
    LossSpec,
    breakdown,
    detection,
    detection_markdown,
    evaluate_checkpoint,
    image_scores,
    main as evaluate_main,
    table_metrics,
)
from training.losses import DiceFocalLoss
from training.split import read_split_csv
from training.synthetic import generate_dataset
from training.train import preset, train


def _result(pred, truth, image_id="IMG", tumor_type="osteosarcoma", center="1", view="frontal", prob=None,
            spec=LossSpec()):
    pred, truth = np.asarray(pred) != 0, np.asarray(truth) != 0
    tp = int((pred & truth).sum())
    fp, fn = int(pred.sum()) - tp, int(truth.sum()) - tp
    prob = pred.astype(np.float64) if prob is None else prob
    return ImageResult(image_id, tumor_type, center, view, float(truth.mean()), (tp, fp, fn, pred.size - tp - fp - fn),
                       spec.terms(prob, truth))


def test_table_metrics_equal_hand_computed_values():
    truth_a = np.zeros((10, 10), np.uint8)
    truth_a[0:2] = 1  # 20 pixels
    pred_a = np.zeros((10, 10), np.uint8)
    pred_a[1:4] = 1  # 30 pixels, 10 of them on the truth: tp 10, fp 20, fn 10, tn 60
    empty = np.zeros((10, 10), np.uint8)  # a normal image left empty: tn 100
    results = [_result(pred_a, truth_a, "A"), _result(empty, empty, "B", tumor_type="normal")]
    t = table_metrics(results, LossSpec())
    pooled, per = t["pooled"], t["per_image"]
    # pooled: tp 10, fp 20, fn 10, tn 160
    assert pooled["dice"] == pytest.approx(20 / 50) == pooled["f1"]
    assert pooled["tumor_iou"] == pytest.approx(10 / 40)
    assert pooled["precision"] == pytest.approx(10 / 30)
    assert pooled["recall"] == pytest.approx(10 / 20)
    assert pooled["pixel_accuracy"] == pytest.approx(170 / 200)
    assert pooled["mean_iou"] == pytest.approx((10 / 40 + 160 / 190) / 2)
    # per image: A scores (0.4, 0.25, 1/3, 0.5, 0.7, bg IoU 60/90); B, empty and right, scores 1 everywhere
    assert per["dice"] == pytest.approx((0.4 + 1) / 2)
    assert per["tumor_iou"] == pytest.approx((0.25 + 1) / 2)
    assert per["precision"] == pytest.approx((1 / 3 + 1) / 2)
    assert per["recall"] == pytest.approx((0.5 + 1) / 2)
    assert per["pixel_accuracy"] == pytest.approx((0.7 + 1) / 2)
    assert per["mean_iou"] == pytest.approx(((0.25 + 60 / 90) / 2 + 1) / 2)
    p, r = per["precision"], per["recall"]
    assert per["f1_of_means"] == pytest.approx(2 * p * r / (p + r))
    assert t["n_images"] == 2 and t["n_positive"] == 1 and t["mean_dice_positive"] == pytest.approx(0.4)


def _independent(preds, truths):
    """Pooled and per-image Dice/IoU/precision/recall from sets of pixel coordinates (no shared code)."""
    def pixels(mask):
        return {tuple(ix) for ix in np.argwhere(mask)}

    per, all_p, all_t = [], set(), set()
    for k, (p, t) in enumerate(zip(preds, truths)):
        P, T = pixels(p), pixels(t)
        all_p |= {(k, *ix) for ix in P}
        all_t |= {(k, *ix) for ix in T}
        inter = len(P & T)
        per.append({"dice": 2 * inter / (len(P) + len(T)), "tumor_iou": inter / len(P | T),
                    "precision": inter / len(P), "recall": inter / len(T)})
    inter = len(all_p & all_t)
    pooled = {"dice": 2 * inter / (len(all_p) + len(all_t)), "tumor_iou": inter / len(all_p | all_t),
              "precision": inter / len(all_p), "recall": inter / len(all_t)}
    return pooled, {k: float(np.mean([s[k] for s in per])) for k in pooled}


def test_table_metrics_agree_with_an_independent_implementation():
    rng = np.random.default_rng(5)
    preds, truths = [], []
    for _ in range(6):
        h, w = rng.integers(20, 40, 2)
        truth = np.zeros((h, w), bool)
        y, x, r = rng.integers(5, 15), rng.integers(5, 15), rng.integers(3, 6)
        truth[y - r : y + r, x - r : x + r] = True
        pred = np.roll(truth, rng.integers(-3, 4), axis=1) | (rng.random((h, w)) < 0.02)
        preds.append(pred)
        truths.append(truth)
    t = table_metrics([_result(p, tr) for p, tr in zip(preds, truths)], LossSpec())
    pooled, per = _independent(preds, truths)
    for key in pooled:
        assert t["pooled"][key] == pytest.approx(pooled[key]), key
        assert t["per_image"][key] == pytest.approx(per[key]), key
    # model.metrics' accumulator (the trainer's) agrees on the pooled and per-image Dice too
    acc = MetricAccumulator()
    for p, tr in zip(preds, truths):
        acc.update(p, tr)
    assert acc.summary()["dice"] == pytest.approx(t["pooled"]["dice"])
    assert acc.summary()["mean_dice"] == pytest.approx(t["per_image"]["dice"])


def test_loss_is_the_training_loss_pooled_and_per_image():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.01, 0.99, (3, 16, 16))
    truths = (rng.random((3, 16, 16)) < 0.3).astype(np.uint8)
    spec = LossSpec(dice_weight=0.7, focal_weight=1.3, gamma=2.0, alpha=0.25)
    results = [_result(pr > 0.5, tr, prob=pr, spec=spec) for pr, tr in zip(probs, truths)]
    t = table_metrics(results, spec)
    torch_loss = DiceFocalLoss(0.7, 1.3, gamma=2.0, alpha=0.25)
    logits = torch.logit(torch.from_numpy(probs))[:, None]
    target = torch.from_numpy(truths)[:, None].double()
    assert t["pooled"]["loss"] == pytest.approx(float(torch_loss(logits, target)), rel=1e-5)
    per = [float(torch_loss(logits[i : i + 1], target[i : i + 1])) for i in range(3)]
    assert t["per_image"]["loss"] == pytest.approx(np.mean(per), rel=1e-5)


def test_breakdowns_group_pooled_scores_and_lesion_sizes():
    big = np.zeros((100, 100), np.uint8)
    big[:30, :30] = 1  # 9 % of the image: large
    small = np.zeros((100, 100), np.uint8)
    small[:3, :3] = 1  # 0.09 %: small
    medium = np.zeros((100, 100), np.uint8)
    medium[:10, :10] = 1  # 1 %: medium
    results = [
        _result(big, big, "a", tumor_type="osteosarcoma", center="1"),
        _result(np.zeros_like(small), small, "b", tumor_type="osteosarcoma", center="2"),
        _result(medium, medium, "c", tumor_type="giant cell tumor", center="2"),
        _result(np.zeros_like(big), np.zeros_like(big), "d", tumor_type="normal", center="1"),
    ]
    assert [r.size_bin for r in results] == ["large (>= 2 %)", "small (< 0.4 %)", "medium (0.4-2 %)", NO_LESION]
    by_type = {row["group"]: row for row in breakdown(results, lambda r: r.tumor_type)}
    assert by_type["osteosarcoma"]["n"] == 2
    assert by_type["osteosarcoma"]["dice"] == pytest.approx(2 * 900 / (900 + 909))  # pooled over both images
    assert by_type["osteosarcoma"]["mean_dice"] == pytest.approx(0.5)  # per image: 1 and 0
    assert by_type["osteosarcoma"]["recall"] == pytest.approx(900 / 909)
    by_centre = {row["group"]: row for row in breakdown(results, lambda r: r.center)}
    assert by_centre["2"]["dice"] == pytest.approx(2 * 100 / (100 + 109))
    assert image_scores(results[3].counts)["dice"] == 1.0


def test_detection_tells_found_from_wrong_place_and_nothing_predicted():
    big = np.zeros((100, 100), np.uint8)
    big[:30, :30] = 1  # large, 900 px
    beside = np.zeros_like(big)
    beside[60:70, 60:70] = 1  # 100 px, not on any tumor here
    corner = np.zeros_like(big)
    corner[:2, :2] = 1  # 4 px on big's corner
    small = np.zeros_like(big)
    small[90:93, 90:93] = 1  # small, 9 px
    none = np.zeros_like(big)
    results = [
        _result(corner, big, "a"),  # found (4 px are enough): fn 896
        _result(beside, big, "b"),  # wrong place: fn 900
        _result(none, small, "c"),  # nothing predicted: fn 9
        _result(none, none, "d", tumor_type="normal"),  # clean
        _result(beside, none, "e", tumor_type="normal"),  # false alarm
    ]
    found = detection(results)
    assert found["overall"] == {"found": 1, "wrong place": 1, "nothing predicted": 1, "clean": 1,
                                "false alarm": 1}
    assert found["n_positive"] == 3 and found["found_rate"] == pytest.approx(1 / 3)
    assert found["fn_share_not_found"] == pytest.approx((900 + 9) / (896 + 900 + 9))
    assert found["by_size"] == {"small (< 0.4 %)": {"found": 0, "wrong place": 0, "nothing predicted": 1},
                                "large (>= 2 %)": {"found": 1, "wrong place": 1, "nothing predicted": 0}}
    assert list(found["by_size"]) == ["small (< 0.4 %)", "large (>= 2 %)"]  # the bins' order, not the images
    text = "\n".join(detection_markdown(found))
    assert "| all | 3 | 1 (33%) | 1 (33%) | 1 (33%) |" in text
    assert "| large (>= 2 %) | 2 | 1 (50%) | 1 (50%) | 0 (0%) |" in text
    assert "50% lie in images whose tumor was not found" in text
    assert "1 clean, 1 with a false alarm" in text
    perfect = detection([_result(big, big, "f")])  # nothing missed: no share to give
    assert perfect["fn_share_not_found"] is None and perfect["found_rate"] == 1.0
    assert "was not found" not in "\n".join(detection_markdown(perfect))


# ---------------------------------------------------------------- the command, end to end on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = generate_dataset(root / "data", 24, seed=4, min_side=48, max_side=80)
    from training.split import main as split_main

    split_main([str(data), "--name", "synth", "--out-dir", str(root / "splits"), "--kind", "grouped"])
    split_file = root / "splits" / "synth-grouped-v1.csv"
    ckpt = train(preset("thesis", data=str(data), split_file=str(split_file), size=32, filters=(4, 8), dropout=0.0,
                        epochs=2, batch_size=4, lr=1e-2, out=str(root / "tiny.pt"), progress=False, tensorboard=False))
    return data, split_file, ckpt, root


def test_evaluate_command_writes_report_json_csv_and_sheet(tiny, capsys):
    data, split_file, ckpt, root = tiny
    out = root / "val"
    assert evaluate_main([str(ckpt), "--data", str(data), "--split-file", str(split_file), "--split", "val",
                          "--out-dir", str(out), "--examples", "3"]) == 0
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    loaded = load_checkpoint(ckpt)
    sf = read_split_csv(split_file)
    assert f"`val` of {sf.name}" in report and sf.sha256[:12] in report
    assert f"{THESIS['dice']:.4f}" in report and "pixel accuracy" in report
    for title in ("By tumor type", "By centre", "By view", "By lesion size", "Found at all"):
        assert title in report
    found = metrics["detection"]
    assert found["n_positive"] == metrics["table"]["n_positive"]
    assert sum(found["overall"].values()) == metrics["table"]["n_images"]
    assert metrics["meta"]["threshold"] == loaded.postprocessor.threshold  # the checkpoint's, chosen on validation
    assert metrics["meta"]["overlap"] == 0
    assert metrics["table"]["n_images"] == len(sf.ids("val"))
    lines = (out / "per_image.csv").read_text().splitlines()
    assert len(lines) == 1 + len(sf.ids("val"))
    outcomes = [row.split(",")[lines[0].split(",").index("outcome")] for row in lines[1:]]
    assert {k: outcomes.count(k) for k in found["overall"]} == found["overall"]
    assert "trained on the form of the pooled column" in report  # the thesis recipe pools its Dice term
    assert LossSpec.from_training_config({"dice_per_image": True}).per_image is True
    sheet = cv2.imread(str(out / "examples.png"))
    rows = min(3, len(sf.ids("val")))  # a title band, then per example a caption band and a row of 4 tiles
    assert sheet is not None and sheet.shape == (18 + rows * (18 + 192), 4 * 192, 3)
    assert "report.md" in capsys.readouterr().out

    # the pooled Dice is what the serving path gives, scored with model.metrics
    records = {r.image_id: r for r in read_btxrd(data).records}
    segmenter = Segmenter(loaded)
    acc = MetricAccumulator()
    for image_id in sf.ids("val"):
        image = load_image(records[image_id])
        acc.update(segmenter.predict([image])[0].mask, load_mask(records[image_id], image.shape))
    assert metrics["table"]["pooled"]["dice"] == pytest.approx(acc.summary()["dice"])


def test_evaluate_warns_when_images_were_trained_on(tiny):
    data, split_file, ckpt, root = tiny
    m = evaluate_checkpoint(ckpt, data, split_file, "train", root / "train", examples=0, quiet=True)
    assert m["meta"]["overlap"] == m["table"]["n_images"] > 0
    m = evaluate_checkpoint(ckpt, data, None, None, root / "all", examples=0, quiet=True)
    assert any("training set" in w for w in m["meta"]["warnings"])
    assert "not held-out" in (root / "all" / "report.md").read_text()


def test_evaluate_cpu_bf16_scores_with_the_workers_bf16_network(tiny, monkeypatch):
    import model.inference

    data, split_file, ckpt, root = tiny
    made = []

    class Recorded(Segmenter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(model.inference, "Segmenter", Recorded)
    m = evaluate_checkpoint(ckpt, data, split_file, "val", root / "bf16", examples=1, quiet=True, cpu_bf16=True)
    assert len(made) == 2 and all(s.cpu_bf16 and s.version.endswith("+cpu-bf16") for s in made)  # scoring, examples
    assert m["meta"]["cpu_bf16"] is True and "bf16 autocast on the CPU" in (root / "bf16" / "report.md").read_text()


def test_flip_tta_averages_the_plain_and_the_mirrored_pass(tiny):
    from training.evaluate import predict

    data, split_file, ckpt, root = tiny
    loaded = load_checkpoint(ckpt)
    segmenter = Segmenter(loaded)
    image = load_image(read_btxrd(data).records[0])
    frame, geometry = loaded.preprocessor(image)
    x = torch.from_numpy(frame)[None, None]
    with torch.no_grad():
        plain = torch.sigmoid(loaded.network(x))[0, 0].numpy()
        mirrored = torch.sigmoid(loaded.network(torch.flip(x, dims=[-1])))[0, 0].numpy()[:, ::-1]
    expected = geometry.restore((plain + mirrored) / 2)
    prob, mask = predict(segmenter, [image], tta=True)[0]
    np.testing.assert_allclose(prob, expected, atol=1e-5)
    np.testing.assert_array_equal(mask, loaded.postprocessor(expected))
    assert not np.allclose(prob, predict(segmenter, [image])[0][0], atol=1e-5)  # TTA changed something

    m = evaluate_checkpoint(ckpt, data, split_file, "val", root / "tta", tta=True, examples=0, quiet=True)
    assert m["meta"]["tta"] == "flip" and "test-time augmentation" in (root / "tta" / "report.md").read_text()
    with pytest.raises(ValueError, match="needs --split-file"):
        evaluate_checkpoint(ckpt, data, None, "test", root / "x", quiet=True)
