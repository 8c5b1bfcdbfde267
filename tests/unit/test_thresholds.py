"""Test-time augmentation (flip, flip4) and a threshold of its own per mode: stored in the checkpoint, used by the
Segmenter, chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint, saved_extra
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


def _tiny_checkpoint(path, post, posts_tta=None):
    torch.manual_seed(0)
    net = AttentionUNet(UNetConfig(filters=(4, 8)))
    return save_checkpoint(path, net, preprocessor=Preprocessor(32), postprocessor=post, postprocessors_tta=posts_tta,
                           version="v", label="random weights")


def test_checkpoint_keeps_a_postprocessing_for_flip_tta(tmp_path):
    loaded = load_checkpoint(_tiny_checkpoint(tmp_path / "a.pt", Postprocessor(0.4, 1e-3),
                                              {"flip": Postprocessor(0.3, 1e-3), "flip4": Postprocessor(0.35)}))
    assert loaded.postprocessor.as_dict() == Postprocessor(0.4, 1e-3).as_dict()
    assert {m: p.as_dict() for m, p in loaded.postprocessors_tta.items()} == {
        "flip": Postprocessor(0.3, 1e-3).as_dict(), "flip4": Postprocessor(0.35).as_dict()}
    assert loaded.info["format"] == "bonedetect-checkpoint/3"  # code that cannot read the TTA thresholds refuses it
    # format /2 (never shipped) held one flat postprocessing for flip TTA: read as the flip mode's
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    raw["format"], raw["postprocessing_tta"] = "bonedetect-checkpoint/2", Postprocessor(0.3, 1e-3).as_dict()
    torch.save(raw, tmp_path / "v2.pt")
    old = load_checkpoint(tmp_path / "v2.pt").postprocessors_tta
    assert {m: p.as_dict() for m, p in old.items()} == {"flip": Postprocessor(0.3, 1e-3).as_dict()}
    plain = load_checkpoint(_tiny_checkpoint(tmp_path / "b.pt", Postprocessor(0.4)))
    assert plain.postprocessors_tta == {} and plain.info["format"] == "bonedetect-checkpoint/1"


def test_segmenter_uses_the_tta_threshold_only_under_flip_tta(tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((40, 56)) * 255).astype(np.uint8)
    probe = Segmenter(load_checkpoint(_tiny_checkpoint(tmp_path / "p.pt", Postprocessor(0.5))), flip_tta=True)
    prob = probe.predict([image])[0].prob
    low, high = (float(v) for v in np.quantile(prob, [0.3, 0.7]))  # two thresholds that give different masks
    loaded = load_checkpoint(_tiny_checkpoint(tmp_path / "t.pt", Postprocessor(high, 0.0), {"flip": Postprocessor(low, 0.0)}))

    tta = Segmenter(loaded, flip_tta=True).predict([image])[0]
    np.testing.assert_allclose(tta.prob, prob, atol=1e-6)
    np.testing.assert_array_equal(tta.mask, postprocess_cropped(Postprocessor(low, 0.0), tta.prob))
    plain_seg = Segmenter(loaded)
    plain = plain_seg.predict([image])[0]
    np.testing.assert_array_equal(plain.mask, postprocess_cropped(Postprocessor(high, 0.0), plain.prob))
    assert tta.mask.sum() > postprocess_cropped(Postprocessor(high, 0.0), tta.prob).sum()  # the two differ here

    # the worker's path (finish_windowed) masks with the same threshold
    seg = Segmenter(loaded, flip_tta=True)
    frame, geometry = seg.prepare(image)
    windowed = seg.finish_windowed(seg.forward([frame])[0], geometry)
    borderline = np.abs(tta.prob - low) < 1e-5
    np.testing.assert_array_equal(windowed.mask[~borderline], tta.mask[~borderline])

    plain_seg.flip_tta = True  # switching TTA on later switches the threshold with it
    assert plain_seg.postprocessor.threshold == low
    plain_seg.flip_tta = "flip4"  # a mode without a threshold of its own: the plain one
    assert plain_seg.postprocessor.threshold == high
    plain_seg.postprocessor = Postprocessor(0.6)  # set by hand: one postprocessing for both
    assert plain_seg.postprocessor.threshold == 0.6
    plain_seg.flip_tta = False
    assert plain_seg.postprocessor.threshold == 0.6


def test_flip4_averages_all_four_mirrorings_and_says_so(tmp_path):
    """INFER_TTA=flip4 against the network run by hand on each mirrored frame."""
    rng = np.random.default_rng(1)
    image = (rng.random((44, 60)) * 255).astype(np.uint8)
    loaded = load_checkpoint(_tiny_checkpoint(tmp_path / "f.pt", Postprocessor(0.5, 0.0)))
    frame, geometry = loaded.preprocessor(image)
    x = torch.from_numpy(frame)[None, None]
    maps = []
    with torch.no_grad():
        for dims in ((), (-1,), (-2,), (-2, -1)):
            xi = torch.flip(x, dims=list(dims)) if dims else x
            p = torch.sigmoid(loaded.network(xi))
            maps.append((torch.flip(p, dims=list(dims)) if dims else p)[0, 0].numpy())
    seg = Segmenter(loaded, flip_tta="flip4", batch_size=2)
    got = seg.predict([image, image[:, ::-1].copy()])
    np.testing.assert_allclose(got[0].prob, geometry.restore(sum(maps) / 4), atol=1e-5)
    two = Segmenter(loaded, flip_tta="flip").predict([image])[0].prob
    assert not np.allclose(got[0].prob, two, atol=1e-5)  # the up-down passes change the map
    np.testing.assert_allclose(got[1].prob, got[0].prob[:, ::-1], atol=1e-5)  # flip4 is mirror-symmetric
    assert seg.version == "v+flip4-tta" and Segmenter(loaded, flip_tta="flip").version == "v+flip-tta"
    from model.inference import default_batch_size

    big = UNetConfig(filters=(4, 8))  # 4 x 256 x 256 first-level values per image: 8 per CPU pass, 2 with flip4
    assert [default_batch_size(big, 256, cuda=False, flip_tta=m) for m in ("off", "flip", "flip4")] == [8, 4, 2]
    with pytest.raises(ValueError, match="TTA mode"):
        Segmenter(loaded, flip_tta="rot90")


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
    that stores that candidate as its threshold for the mode (an independent path: its own loop and table)."""
    data, split_file, ckpt, root, val = tiny
    loaded = load_checkpoint(ckpt)
    candidates = (0.2, 0.35, 0.5, 0.65)
    for mode in ("flip", "flip4"):
        best, dice = choose_threshold(loaded, val, candidates, tta=mode)
        assert set(dice) == set(candidates) and best == max(candidates, key=lambda t: (dice[t], -abs(t - 0.5)))
        assert len({round(d, 6) for d in dice.values()}) > 1  # the candidates differ, so the choice means something
        for t in candidates:
            path = save_checkpoint(root / f"t{t}.pt", loaded.network, preprocessor=loaded.preprocessor,
                                   postprocessor=loaded.postprocessor, postprocessors_tta={mode: Postprocessor(t)},
                                   version="t", label="l")
            m = evaluate_checkpoint(path, data, split_file, "val", root / f"eval{t}", tta=mode, examples=0, quiet=True)
            assert m["meta"]["threshold"] == t and m["meta"]["threshold_for_tta"] is True and m["meta"]["tta"] == mode
            assert m["table"]["pooled"]["dice"] == pytest.approx(dice[t], abs=1e-9)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        choose_threshold(loaded, val, (0.0, 0.5))


def test_training_with_tta_stores_the_threshold_chosen_on_validation(tiny):
    data, split_file, ckpt, root, val = tiny
    loaded = load_checkpoint(ckpt)
    assert set(loaded.postprocessors_tta) == {"flip", "flip4"}
    for mode in ("flip", "flip4"):
        best, dice = choose_threshold(loaded, val, (0.2, 0.35, 0.5, 0.65), tta=mode)
        assert loaded.postprocessors_tta[mode].threshold == best == loaded.metrics[f"threshold_{mode}"]
        assert loaded.metrics[f"validation_{mode}"]["dice"] == pytest.approx(dice[best], abs=1e-9)


def test_thresholds_command_adds_a_tta_threshold_and_keeps_the_rest(tiny, capsys):
    data, split_file, ckpt, root, val = tiny
    trained = load_checkpoint(ckpt)
    no_tta = root / "no-tta.pt"  # a checkpoint as shipped before flip TTA had a threshold: none, fp16 weights
    save_checkpoint(no_tta, trained.network, preprocessor=trained.preprocessor, postprocessor=trained.postprocessor,
                    version="shipped", label=trained.label, metrics=dict(trained.metrics), half=True,
                    extra=saved_extra(trained))
    before = load_checkpoint(no_tta)
    assert before.postprocessors_tta == {} and before.info["stored_half"]
    out = root / "with-tta.pt"
    assert thresholds_main([str(no_tta), "--data", str(data), "--split-file", str(split_file), "--tta", "flip4",
                            "--thresholds", "0.1,0.3,0.45", "--out", str(out)]) == 0
    best, dice = choose_threshold(before, val, (0.1, 0.3, 0.45), tta="flip4")
    after = load_checkpoint(out)
    assert list(after.postprocessors_tta) == ["flip4"]
    assert after.postprocessors_tta["flip4"].as_dict() == {**before.postprocessor.as_dict(), "threshold": best}
    assert after.postprocessor.as_dict() == before.postprocessor.as_dict()  # plain serving unchanged
    assert after.version == f"shipped-flip4-t{best:g}" and after.info["stored_half"]
    for k, v in before.network.state_dict().items():
        torch.testing.assert_close(after.network.state_dict()[k], v, rtol=0, atol=0)
    assert after.info["threshold_choices"] == [{
        "from_version": "shipped", "split_file": read_split_csv(split_file).name,
        "split_sha256": read_split_csv(split_file).sha256, "tta": "flip4", "threshold": best, "dice": dice[best]}]
    assert after.metrics["validation_flip4"]["dice"] == dice[best]
    assert after.metrics["before_threshold_choice"]["validation_flip4"] == trained.metrics["validation_flip4"]
    assert after.metrics["validation_flip"] == trained.metrics["validation_flip"]  # the other mode's still hold
    assert after.metrics["validation"] == trained.metrics["validation"]  # plain scores still hold
    assert f"chosen: {best:.2f}" in capsys.readouterr().out

    assert after.recommended_tta == "off"  # only --recommend changes how workers serve it by default
    recommended = root / "recommended.pt"
    assert thresholds_main([str(no_tta), "--data", str(data), "--split-file", str(split_file), "--tta", "flip4",
                            "--thresholds", "0.1,0.3,0.45", "--recommend", "--out", str(recommended)]) == 0
    assert load_checkpoint(recommended).recommended_tta == "flip4"
    with pytest.raises(SystemExit):
        thresholds_main([str(no_tta), "--data", str(data), "--split-file", str(split_file), "--recommend",
                         "--out", str(root / "y.pt")])

    # the plain threshold re-chosen: the TTA one stays, the plain scores move aside
    again = root / "plain.pt"
    assert thresholds_main([str(out), "--data", str(data), "--split-file", str(split_file),
                            "--thresholds", "0.2,0.6", "--out", str(again)]) == 0
    best_plain, _ = choose_threshold(after, val, (0.2, 0.6))
    final = load_checkpoint(again)
    assert final.postprocessor.threshold == best_plain and final.postprocessors_tta["flip4"].threshold == best
    assert final.version == f"shipped-flip4-t{best:g}-t{best_plain:g}" and len(final.info["threshold_choices"]) == 2
    assert final.metrics["before_threshold_choice"]["validation"] == trained.metrics["validation"]


def test_thresholds_command_refuses_images_it_may_not_see(tiny, tmp_path):
    data, split_file, ckpt, root, val = tiny
    from training.split import main as split_main
    from training.thresholds import check_held_out

    split_main([str(data), "--name", "other", "--out-dir", str(tmp_path), "--kind", "thesis"])
    other = next(tmp_path.glob("other-*.csv"))
    args = [str(ckpt), "--data", str(data), "--split-file", str(other), "--out", str(tmp_path / "x.pt")]
    with pytest.raises(SystemExit):  # another split file's validation part may hold this one's test images
        thresholds_main(args)
    assert not (tmp_path / "x.pt").exists()
    loaded = load_checkpoint(ckpt)
    train_records = assign(read_btxrd(data).records, read_split_csv(split_file))[0]["train"]
    with pytest.raises(ValueError, match="training set"):
        check_held_out(loaded, read_split_csv(split_file).sha256, val + train_records[:1])
    check_held_out(loaded, read_split_csv(other).sha256, val, other_split=True)  # allowed when asked for


def test_workers_serve_the_tta_mode_of_their_settings_with_its_threshold(tmp_path):
    import model.inference
    from bonedetect import settings as settings_module
    from bonedetect.settings import Settings
    from worker.tasks import warm_segmenter

    assert settings_module.TTA_MODES == ("auto", *model.inference.TTA_MODES)
    assert Settings.from_env({}).infer_tta == "auto"
    loaded = load_checkpoint(_tiny_checkpoint(tmp_path / "w.pt", Postprocessor(0.5), {"flip4": Postprocessor(0.3)}))
    served = {m: warm_segmenter(loaded, Settings.from_env({"INFER_TTA": m, "TORCH_COMPILE": "off"}), cuda=False)
              for m in ("auto", "off", "flip", "flip4")}
    assert {m: s.version for m, s in served.items()} == {
        "auto": "v", "off": "v", "flip": "v+flip-tta", "flip4": "v+flip4-tta"}  # auto: the file recommends none
    assert {m: s.postprocessor.threshold for m, s in served.items()} == {"auto": 0.5, "off": 0.5, "flip": 0.5, "flip4": 0.3}

    # a checkpoint that recommends flip4: served so by default, and off when ops ask for speed
    torch.manual_seed(0)
    net = AttentionUNet(UNetConfig(filters=(4, 8)))
    with pytest.raises(ValueError, match="no threshold of its own"):
        save_checkpoint(tmp_path / "bad.pt", net, preprocessor=Preprocessor(32), postprocessor=Postprocessor(0.5),
                        version="r", label="l", recommended_tta="flip4")
    path = save_checkpoint(tmp_path / "r.pt", net, preprocessor=Preprocessor(32), postprocessor=Postprocessor(0.5),
                           postprocessors_tta={"flip4": Postprocessor(0.3)}, recommended_tta="flip4",
                           version="r", label="l")
    recommending = load_checkpoint(path)
    assert recommending.recommended_tta == "flip4" and loaded.recommended_tta == "off"
    auto = warm_segmenter(recommending, Settings.from_env({"TORCH_COMPILE": "off"}), cuda=False)
    assert auto.version == "r+flip4-tta" and auto.postprocessor.threshold == 0.3
    off = warm_segmenter(recommending, Settings.from_env({"INFER_TTA": "off", "TORCH_COMPILE": "off"}), cuda=False)
    assert off.version == "r" and off.postprocessor.threshold == 0.5
    with pytest.raises(ValueError, match="INFER_TTA"):
        Settings.from_env({"INFER_TTA": "rot90"})
