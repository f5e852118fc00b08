"""The pair head, batch building and a short training run on the synthetic sample."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.catalog import load_catalog
from engine.runfolder import RunFolder
from siamese.embed import embed_records
from siamese.model import ModelConfig, PairHead, SiameseNet
from siamese.train import TrainConfig
from siamese.trainer import augment, batch_pairs, build_batches, fit
from tests.conftest import TINY_INPUT


def test_pair_head_is_symmetric_and_finite():
    torch.manual_seed(0)
    head = PairHead(32)
    a, b = F.normalize(torch.randn(8, 32), dim=1), F.normalize(torch.randn(8, 32), dim=1)
    la, lb = head(a, b), head(b, a)
    assert la.shape == (8,) and torch.isfinite(la).all()
    assert torch.allclose(la, lb, atol=1e-6)
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


def test_batch_pairs_labels_are_right():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 3)
    pos = np.array([i + 1 if i % 3 < 2 else i - 2 for i in range(18)])
    neg = (np.arange(18) + 3) % 18
    batch = np.arange(18)
    scores = rng.standard_normal((18, 18)).astype(np.float32)
    a, b, y = batch_pairs(batch, labels, pos, neg, scores, 0.0, rng)
    assert len(a) == 36 and y.sum() == 18
    assert np.all((labels[batch[a]] == labels[batch[b]]) == (y == 1))
    assert np.all(a != b)


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
    assert second["history"][0] == first["history"][0]
