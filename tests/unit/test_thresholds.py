"""A threshold of its own for flip TTA: stored in the checkpoint, used by the Segmenter, chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.inference import Segmenter, postprocess_cropped
from model.network import AttentionUNet, UNetConfig
from model.postprocess import Postprocessor
from model.preprocess import Preprocessor
from training.btxrd import read_btxrd
from training.evaluate import evaluate_checkpoint
from training.split import assign, read_split_csv
from training.synthetic import generate_dataset
from training.thresholds import choose_threshold, main as thresholds_main
from training.train import preset, train


def _tiny_checkpoint(path, post, post_tta=None):
    torch.manual_seed(0)
    net = AttentionUNet(UNetConfig(filters=(4, 8)))
    return save_checkpoint(path, net, preprocessor=Preprocessor(32), postprocessor=post, postprocessor_tta=post_tta,
                           version="v", label="random weights")


def test_checkpoint_keeps_a_postprocessing_for_flip_tta(tmp_path):
    loaded = load_checkpoint(_tiny_checkpoint(tmp_path / "a.pt", Postprocessor(0.4, 1e-3), Postprocessor(0.3, 1e-3)))
    assert loaded.postprocessor.as_dict() == Postprocessor(0.4, 1e-3).as_dict()
    assert loaded.postprocessor_tta.as_dict() == Postprocessor(0.3, 1e-3).as_dict()
    assert load_checkpoint(_tiny_checkpoint(tmp_path / "b.pt", Postprocessor(0.4))).postprocessor_tta is None


def test_segmenter_uses_the_tta_threshold_only_under_flip_tta(tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((40, 56)) * 255).astype(np.uint8)
    probe = Segmenter(load_checkpoint(_tiny_checkpoint(tmp_path / "p.pt", Postprocessor(0.5))), flip_tta=True)
    prob = probe.predict([image])[0].prob
    low, high = (float(v) for v in np.quantile(prob, [0.3, 0.7]))  # two thresholds that give different masks
    loaded = load_checkpoint(_tiny_checkpoint(tmp_path / "t.pt", Postprocessor(high, 0.0), Postprocessor(low, 0.0)))

    tta = Segmenter(loaded, flip_tta=True).predict([image])[0]
    np.testing.assert_allclose(tta.prob, prob, atol=1e-6)
    np.testing.assert_array_equal(tta.mask, postprocess_cropped(Postprocessor(low, 0.0), tta.prob))
    plain_seg = Segmenter(loaded)
    plain = plain_seg.predict([image])[0]
    np.testing.assert_array_equal(plain.mask, postprocess_cropped(Postprocessor(high, 0.0), plain.prob))
    assert tta.mask.sum() > postprocess_cropped(Postprocessor(high, 0.0), tta.prob).sum()  # the two differ here

    plain_seg.flip_tta = True  # switching TTA on later switches the threshold with it
    assert plain_seg.postprocessor.threshold == low
    plain_seg.postprocessor = Postprocessor(0.6)  # set by hand: one postprocessing for both
    assert plain_seg.postprocessor.threshold == 0.6
    plain_seg.flip_tta = False
    assert plain_seg.postprocessor.threshold == 0.6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("thr")
    data = generate_dataset(root / "data", 24, seed=5, min_side=48, max_side=80)
    from training.split import main as split_main

    split_main([str(data), "--name", "synth", "--out-dir", str(root / "splits"), "--kind", "grouped"])
    split_file = root / "splits" / "synth-grouped-v1.csv"
    ckpt = train(preset("thesis", data=str(data), split_file=str(split_file), size=32, filters=(4, 8), dropout=0.0,
                        epochs=2, batch_size=4, lr=1e-2, tta=True, thresholds=(0.2, 0.35, 0.5, 0.65),
                        out=str(root / "tiny.pt"), progress=False, tensorboard=False))
    val = assign(read_btxrd(data).records, read_split_csv(split_file))[0]["val"]
    return data, split_file, ckpt, root, val


def test_chosen_scores_equal_the_evaluators_pooled_dice(tiny):
    """Each candidate's Dice from choose_threshold equals training.evaluate's pooled Dice for a checkpoint
    that stores that candidate as its flip-TTA threshold (an independent path: its own loop and table)."""
    data, split_file, ckpt, root, val = tiny
    loaded = load_checkpoint(ckpt)
    candidates = (0.2, 0.35, 0.5, 0.65)
    best, dice = choose_threshold(loaded, val, candidates, tta=True)
    assert set(dice) == set(candidates) and best == max(candidates, key=lambda t: (dice[t], -abs(t - 0.5)))
    assert len({round(d, 6) for d in dice.values()}) > 1  # the candidates differ, so the choice means something
    for t in candidates:
        path = save_checkpoint(root / f"t{t}.pt", loaded.network, preprocessor=loaded.preprocessor,
                               postprocessor=loaded.postprocessor, postprocessor_tta=Postprocessor(t),
                               version="t", label="l")
        m = evaluate_checkpoint(path, data, split_file, "val", root / f"eval{t}", tta=True, examples=0, quiet=True)
        assert m["meta"]["threshold"] == t and m["meta"]["threshold_for_tta"] is True
        assert m["table"]["pooled"]["dice"] == pytest.approx(dice[t], abs=1e-9)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        choose_threshold(loaded, val, (0.0, 0.5))


def test_training_with_tta_stores_the_threshold_chosen_on_validation(tiny):
    data, split_file, ckpt, root, val = tiny
    loaded = load_checkpoint(ckpt)
    best, dice = choose_threshold(loaded, val, (0.2, 0.35, 0.5, 0.65), tta=True)
    assert loaded.postprocessor_tta is not None and loaded.postprocessor_tta.threshold == best
    assert loaded.metrics["threshold_tta"] == best
    assert loaded.metrics["validation_tta"]["dice"] == pytest.approx(dice[best], abs=1e-9)


def test_thresholds_command_writes_a_copy_with_the_tta_threshold(tiny, capsys):
    data, split_file, ckpt, root, val = tiny
    before = load_checkpoint(ckpt)
    out = root / "with-tta.pt"
    assert thresholds_main([str(ckpt), "--data", str(data), "--split-file", str(split_file), "--tta",
                            "--thresholds", "0.1,0.3,0.45", "--out", str(out)]) == 0
    best, _ = choose_threshold(before, val, (0.1, 0.3, 0.45), tta=True)
    after = load_checkpoint(out)
    assert after.postprocessor_tta.threshold == best
    assert after.postprocessor.as_dict() == before.postprocessor.as_dict()  # plain serving unchanged
    assert after.version == f"{before.version}-tta{round(best * 100):02d}"
    for k, v in before.network.state_dict().items():
        torch.testing.assert_close(after.network.state_dict()[k], v)
    assert after.info["threshold_choices"][-1]["from_version"] == before.version
    assert f"chosen: {best:.2f}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # never on the test split
        thresholds_main([str(ckpt), "--data", str(data), "--split-file", str(split_file), "--split", "test",
                         "--out", str(root / "x.pt")])
