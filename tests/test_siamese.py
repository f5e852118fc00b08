"""The pair head, batch building and a short training run on the synthetic sample."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.catalog import load_catalog
from core.errors import UserError
from core.runfolder import RunFolder
from siamese.embed import embed_records
from siamese.model import ModelConfig, PairHead, SiameseNet
from siamese.trainer import TrainConfig
from siamese.lap_miner import LapMiner, MinerConfig
from siamese.trainer import (SubCenterArcFace, _State, add_to_average, augment, averaging, batch_mined_negatives,
                             batch_pair_weights, build_batches, fit)
from tests.conftest import TINY_INPUT


def test_pair_head_is_symmetric_and_finite():
    torch.manual_seed(0)
    head = PairHead(32)
    with torch.no_grad():  # every parameter random: the learned part starts at zero otherwise
        for p in head.parameters():
            p.copy_(torch.randn_like(p))
    a, b = F.normalize(torch.randn(8, 32), dim=1), F.normalize(torch.randn(8, 32), dim=1)
    la, lb = head(a, b), head(b, a)
    learned = la - head.cosine_logit(a, b)
    assert learned.abs().min() > 1e-3  # the part over [a*b, a+b, |a-b|, (a-b)^2] is really there
    assert la.shape == (8,) and torch.isfinite(la).all()
    assert torch.allclose(la, lb, atol=1e-5)
    assert torch.isfinite(head(a, a)).all() and torch.isfinite(head(a, torch.zeros_like(a))).all()


def test_build_batches_partitions_and_keeps_individuals_whole():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 5)  # 20 individuals x 5 photos
    na = np.arange(100)
    nb = rng.permutation(100)
    batches = build_batches(labels, na, nb, 16, rng)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(100))  # every image exactly once
    assert all(len(b) <= 16 for b in batches)
    for b in batches:
        for lab in set(labels[b]):
            assert (labels[b] == lab).sum() == 5  # an individual is never split across batches


def test_batch_pair_weights_known_answer():
    # individuals x (left, left, right) and y (left, right): one positive each side at most
    labels = np.array(["x", "x", "x", "y", "y"])
    groups = np.array(["x|l", "x|l", "x|r", "y|l", "y|r"])
    mined = np.array([3, -1, 4, -1, -1])  # photo 0's mined negative is photo 3, photo 2's is photo 4
    a, b, w, target = batch_pair_weights(groups, labels, mined, 0.5, torch.device("cpu"))
    pairs = {(int(i), int(j)): (float(t), float(v)) for i, j, t, v in zip(a, b, target, w)}
    # (0,1) is the only positive; (0,2) and (3,4) are one individual seen from two sides: left out
    assert {k for k, (t, _) in pairs.items() if t == 1} == {(0, 1)}
    assert (0, 2) not in pairs and (3, 4) not in pairs and len(pairs) == 7
    assert sum(v for _, v in pairs.values()) == pytest.approx(1.0)
    assert pairs[(0, 1)][1] == pytest.approx(0.5)  # positives: half the loss
    assert pairs[(0, 3)][1] == pytest.approx(0.125) and pairs[(2, 4)][1] == pytest.approx(0.125)  # mined
    assert pairs[(1, 3)][1] == pytest.approx(0.25 / 4)  # the other 4 negatives share the rest


def test_batch_pair_weights_without_mined_pairs_share_evenly():
    labels = np.repeat(np.arange(4), 2)
    a, b, w, target = batch_pair_weights(labels.astype(str), labels, np.full(8, -1), 0.5, torch.device("cpu"))
    assert int(target.sum()) == 4 and len(a) == 28
    assert torch.allclose(w[target == 1], torch.tensor(0.5 / 4))
    assert torch.allclose(w[target == 0], torch.tensor(0.5 / 24))  # no mined pair: its share goes to the rest


def test_augment_shape_and_no_flip(sample):
    cfg = TrainConfig(model=ModelConfig(input_size=TINY_INPUT).resolved())
    img = np.zeros((80, 120, 3), np.uint8)
    img[:, :60] = 255  # left half white: without a flip it stays on the left
    out = augment(img, cfg, np.random.default_rng(0))
    assert out.shape == (3, *TINY_INPUT) and out.dtype == np.float32
    assert out[:, :, :10].mean() > out[:, :, -10:].mean()


@pytest.mark.slow
def test_short_training_lowers_the_pair_loss(sample, tmp_path):
    catalog = load_catalog(sample)
    cfg = TrainConfig(model=ModelConfig(input_size=TINY_INPUT).resolved(), epochs=8, batch_size=16, seed=0,
                      lr_backbone=5e-4, lr_head=1e-2, noise_start=1.0, noise_end=0.5)
    torch.manual_seed(0)
    model = SiameseNet(cfg.model)
    records = catalog.records
    labels = np.array([r.individual_id for r in records])
    same = labels[:, None] == labels[None, :]
    ii, jj = np.triu_indices(len(records), 1)

    def pair_loss():
        e = torch.from_numpy(embed_records(model, records, None, 16, progress=False).embeddings)
        with torch.no_grad():
            logit = model.pair_logit(e[ii], e[jj])
        y = torch.from_numpy(same[ii, jj].astype(np.float32))
        w = torch.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum())  # balance the few positives
        return float((F.binary_cross_entropy_with_logits(logit, y, reduction="none") * w).sum())

    before = pair_loss()
    run = RunFolder(tmp_path / "run")
    run.create({})
    summary = fit(model, catalog, set(), cfg, run, progress=False)
    after = pair_loss()
    assert summary["epochs_trained"] == 8 and len(summary["history"]) == 8
    assert all(np.isfinite(h["loss"]) for h in summary["history"])
    assert after < before - 0.01, (before, after)
    assert run.checkpoint_path.is_file()


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(sample, tmp_path):
    catalog = load_catalog(sample)
    base = dict(model=ModelConfig(input_size=TINY_INPUT).resolved(), batch_size=16, seed=3)
    run = RunFolder(tmp_path / "run")
    run.create({})
    first = fit(SiameseNet(base["model"]), catalog, set(), TrainConfig(epochs=1, **base), run, progress=False)
    assert first["epochs_trained"] == 1
    model = SiameseNet(base["model"])
    second = fit(model, catalog, set(), TrainConfig(epochs=2, **base), run, resume=True, progress=False)
    assert second["epochs_trained"] == 2
    assert [h["epoch"] for h in second["history"]] == [1, 2]  # epoch 1 came from the checkpoint
    assert first["averaged_epochs"] == 1 and second["averaged_epochs"] == 2  # the average goes on too
    assert second["history"][0] == first["history"][0]


def test_weight_average_is_the_running_mean_of_the_epochs_weights():
    state = _State()
    epochs = [{"w": torch.tensor([1.0, -2.0]), "b": torch.tensor(0.5), "n": torch.tensor(k)} for k in (1, 2, 3)]
    epochs[1]["w"], epochs[2]["w"] = torch.tensor([2.0, 0.0]), torch.tensor([6.0, 5.0])
    for e in epochs:
        add_to_average(state, e)
    assert state.averaged == 3
    assert torch.allclose(state.average["w"], torch.tensor([3.0, 1.0]))
    assert torch.allclose(state.average["b"], torch.tensor(0.5))
    assert state.average["n"].item() == 3  # an integer buffer (BatchNorm's counter): the latest
    epochs[2]["w"] += 100  # the average holds copies
    assert torch.allclose(state.average["w"], torch.tensor([3.0, 1.0]))


def test_the_epochs_averaged():
    cfg = TrainConfig(epochs=40, max_minutes=None, average_from=0.75)
    joined = [e for e in range(1, 41) if averaging(cfg, e, 0.0, last=False)]
    assert joined == list(range(30, 41))  # 30/39 >= 0.75: the last quarter of the schedule
    cfg = TrainConfig(epochs=40, max_minutes=10.0, average_from=0.75)
    assert not averaging(cfg, 5, 7 * 60, last=False) and averaging(cfg, 5, 8 * 60, last=False)  # by the clock
    assert averaging(cfg, 5, 60, last=True)  # stopped by the budget: the last epoch always joins
    assert averaging(TrainConfig(epochs=1, average_from=1.0), 1, 0.0, last=False)
    cfg = TrainConfig(epochs=40, max_minutes=None, average_from=1.0)
    assert [e for e in range(1, 41) if averaging(cfg, e, 0.0, last=False)] == [40]  # the last epoch's alone
    assert not any(averaging(TrainConfig(epochs=3, average_from=None), e, 0.0, last=e == 3) for e in (1, 2, 3))


def test_training_keeps_the_mean_of_the_last_epochs_weights(sample, tmp_path, monkeypatch):
    catalog = load_catalog(sample)
    cfg = TrainConfig(model=ModelConfig(input_size=TINY_INPUT).resolved(), epochs=3, batch_size=16, seed=0,
                      average_from=0.75)
    ends = []  # the weights at each epoch's end, as the checkpoint saves them
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (
        ends.append({n: v.clone() for n, v in obj["model"].items()}) if isinstance(obj, dict) and "optimizer" in obj
        else None, save(obj, f, *a, **k))[1])
    heldout = {r.individual_id for r in catalog.records[-8:]}
    model = SiameseNet(cfg.model)
    run = RunFolder(tmp_path / "run")
    run.create({})
    summary = fit(model, catalog, heldout, cfg, run, progress=False)
    assert len(ends) == 3 and summary["averaged_epochs"] == 2  # epochs 2 and 3: 2/2 and 3/2 of the schedule
    kept = model.state_dict()
    for name, v in kept.items():
        if v.is_floating_point():
            assert torch.allclose(v, (ends[1][name] + ends[2][name]) / 2, atol=1e-6), name
    moved = [n for n in kept if n.startswith("head.") and not torch.equal(ends[1][n], ends[2][n])]
    assert moved  # the two epochs differ, so the mean is neither of them
    assert summary["val_map5_head_averaged"] is not None and summary["best_val"] >= 0  # the best single epoch's, for comparison


def test_subcenter_arcface_known_answer():
    # two individuals, one centre each along x and y: a photo on x is class 0 with cosine 1
    head = SubCenterArcFace(dim=2, n_classes=2, subcenters=1, margin=0.5, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    e = torch.tensor([[1.0, 0.0]])
    loss = head(e, torch.tensor([0]))
    # the true class's angle 0 gets the margin: logits 10*cos(0.5) and 10*cos(pi/2) = 0
    expected = -torch.log_softmax(torch.tensor([10 * math.cos(0.5), 0.0]), 0)[0]
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-3)
    # the wrong label costs much more; gradients reach the centres
    wrong = head(e, torch.tensor([1]))
    assert float(wrong.detach()) > float(loss.detach()) + 5
    wrong.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_subcenter_arcface_takes_the_best_subcenter():
    # class 0's centres: y and x; class 1's: both -x. A photo on x is class 0 by its second centre
    two = SubCenterArcFace(dim=2, n_classes=2, subcenters=2, margin=0.0, scale=1.0)
    with torch.no_grad():
        two.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]))
    loss = two(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    expected = -torch.log_softmax(torch.tensor([1.0, -1.0]), 0)[0]  # class 0: max(0, 1); class 1: -1
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-4)


def test_batch_mined_negatives_pick_the_most_similar_other_individual():
    # x0 looks like y0, x1 like y1: the exact in-batch assignment pairs them across individuals
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]), dim=1)
    labels = np.array(["x", "x", "y", "y"])
    mined = batch_mined_negatives(e, labels, LapMiner(MinerConfig(recent_memory=0)), 0.0,
                                  np.random.default_rng(0))
    assert mined.tolist() == [2, 3, 0, 1]


def test_default_recipe_weights():
    # what the default trains with (issue 10 measured the alternatives: bench/embedding_recipe.py)
    cfg = TrainConfig()
    assert cfg.mining == "epoch" and cfg.mined_weight == 0.0 and cfg.arcface_weight == 0.0
    assert cfg.freeze_blocks == 3  # the stem and 3 of mobilenetv2's 7 stages stay pretrained


@pytest.mark.slow
def test_arcface_and_batch_mining_train(sample, tmp_path):
    catalog = load_catalog(sample)
    cfg = TrainConfig(model=ModelConfig(input_size=TINY_INPUT).resolved(), epochs=2, batch_size=16, seed=0,
                      mining="batch", mined_weight=0.5, arcface_weight=1.0)
    run = RunFolder(tmp_path / "run")
    run.create({})
    summary = fit(SiameseNet(cfg.model), catalog, set(), cfg, run, progress=False)
    assert summary["epochs_trained"] == 2
    assert all(np.isfinite(h["loss"]) for h in summary["history"][-2:])
    assert summary["history"][-1]["mined_negatives_in_batch"] > 0.5  # in-batch LAP names most photos' negative
    ck = torch.load(run.checkpoint_path, weights_only=False)
    assert ck["arcface"]["weight"].shape[0] == 3 * len({r.individual_id for r in catalog.records})


def test_frozen_early_layers_keep_their_weights(sample, tmp_path):
    catalog = load_catalog(sample)
    cfg = TrainConfig(model=ModelConfig(input_size=TINY_INPUT).resolved(), epochs=1, batch_size=16, seed=0,
                      freeze_blocks=2)
    model = SiameseNet(cfg.model)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    run = RunFolder(tmp_path / "run")
    run.create({})
    fit(model, catalog, set(), cfg, run, progress=False)
    after = model.backbone.state_dict()
    frozen = [k for k in before if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    trained = [k for k in before if k.startswith("blocks.2.") and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    with pytest.raises(UserError, match="has 7 stages"):
        fit(SiameseNet(cfg.model), catalog, set(), TrainConfig(model=cfg.model, epochs=1, freeze_blocks=9),
            RunFolder(tmp_path / "run2"), progress=False)


def test_mirror_embedding_is_the_mean_of_the_photo_and_its_mirror_image():
    """ModelConfig.mirror (the default): a photo's features are the mean of its own and its mirror
    image's, so a photo and its mirror image embed the same; without it they differ. Run folders saved
    before the setting read back without it, and the setting is part of the cache fingerprint."""
    from siamese.embed import features_batch, model_fingerprint

    torch.manual_seed(0)
    plain = SiameseNet(ModelConfig(input_size=(64, 96), mirror=False), load_pretrained=False).eval()
    mirrored = SiameseNet(ModelConfig(input_size=(64, 96)), load_pretrained=False).eval()
    mirrored.load_state_dict(plain.state_dict())
    assert mirrored.config.mirror
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    flipped = np.ascontiguousarray(x[..., ::-1])
    own, other = features_batch(plain, x, 2), features_batch(plain, flipped, 2)
    assert np.abs(own - other).max() > 1e-3  # the network alone tells a photo from its mirror image
    np.testing.assert_allclose(features_batch(mirrored, x, 2), (own + other) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features_batch(mirrored, flipped, 2), features_batch(mirrored, x, 2),
                               rtol=1e-5, atol=1e-6)
    assert model_fingerprint(plain) != model_fingerprint(mirrored)
    saved_before = {k: v for k, v in mirrored.config.to_dict().items() if k != "mirror"}
    assert ModelConfig.from_dict(saved_before).mirror is False
    assert ModelConfig.from_dict(mirrored.config.to_dict()).mirror is True
    assert mirrored.config.resolved().mirror is True


def test_views_embedding_is_the_mean_of_each_views_features(tmp_path, monkeypatch):
    """ModelConfig.views: a photo's features are the mean of those of its views (each view's through
    the network alone), also when the views of a batch of photos exceed one network batch and when
    photos of one batch have different counts of views (a catalog bbox: photo and box one); the
    views are part of the cache fingerprint, and validation in training embeds the box alone and
    leaves the network's views as set."""
    import cv2

    from core.catalog import Record
    from siamese.embed import features_batch, load_views, model_fingerprint
    from siamese.model import preprocess
    from siamese.trainer import validation_map5

    rng = np.random.default_rng(0)
    recs = []
    for i in range(3):
        img = np.full((90, 150, 3), 128, np.uint8)  # textured in its middle: the focus box is smaller
        img[20:70, 30:120] = rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
        recs.append(Record(image=f"{i}.png", path=tmp_path / f"{i}.png", individual_id=str(i % 2)))
    # with a catalog bbox the photo is the box: two views, in the same batch as photos of three
    recs.insert(1, Record(image="0.png", path=tmp_path / "0.png", individual_id="1", bbox=(10, 5, 120, 80)))
    torch.manual_seed(0)
    views = ("box", "centre", "photo")
    one = SiameseNet(ModelConfig(input_size=(64, 96), views=("box",)), load_pretrained=False).eval()
    three = SiameseNet(ModelConfig(input_size=(64, 96), views=views), load_pretrained=False).eval()
    three.load_state_dict(one.state_dict())
    got = embed_records(three, recs, None, batch_size=2, progress=False).features
    assert [len(load_views(r, three.config)) for r in recs] == [3, 2, 3, 3]
    for rec, f in zip(recs, got):
        x = np.stack([preprocess(v, three.config) for v in load_views(rec, three.config)])
        per_view = features_batch(one, x, 3)
        assert np.abs(per_view[0] - per_view[1]).max() > 1e-4  # the views differ
        np.testing.assert_allclose(f, per_view.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embed_records(one, recs, None, batch_size=2, progress=False).features,
                               np.stack([features_batch(one, preprocess(load_views(r, one.config)[0], one.config)[None],
                                                        2)[0] for r in recs]), rtol=1e-4, atol=1e-5)
    assert model_fingerprint(one) != model_fingerprint(three)
    # the box alone hashes as before views existed (without the setting): older caches stay valid
    import hashlib
    h = hashlib.sha1(repr(sorted((k, v) for k, v in one.config.to_dict().items() if k != "views")).encode())
    h.update(one.precision.name.encode())
    for name, t in list(one.backbone.state_dict().items()) + [("gem_p", one.pool.p.detach())]:
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    assert model_fingerprint(one) == h.hexdigest()
    seen = []

    def recording(model, *args, **kwargs):
        seen.append(model.config.views)
        return embed_records(model, *args, **kwargs)

    monkeypatch.setattr("siamese.trainer.embed_records", recording)
    validation_map5(three, recs, 2)
    assert seen == [("box",)] and three.config.views == views


def test_an_unreadable_training_photo_is_skipped_naming_its_csv_line(tmp_path, caplog):
    from core.catalog import Record
    from siamese.trainer import _load_resized

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x00" * 10)
    with caplog.at_level("WARNING", logger="siamese.trainer"):
        assert _load_resized(Record("broken.jpg", broken, "a", line=7), (64, 96)) is None
    assert "broken.jpg" in caplog.text and "(line 7 of its CSV)" in caplog.text, caplog.text
