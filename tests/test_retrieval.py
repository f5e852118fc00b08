"""Embedding cache, faiss retrieval against brute force, viewpoint-restricted search."""
import os

from pathlib import Path

import h5py
import numpy as np
import pytest

from core import cache as cache_module
from core.cache import FeatureCache, record_key
from core.errors import ImageError
from core.catalog import load_catalog
from siamese.embed import embed_records
from siamese.index import EmbeddingIndex, IndividualMeans, build_index
from siamese.model import ModelConfig, SiameseNet
from tests.conftest import TINY_INPUT


@pytest.fixture(scope="module")
def model():
    return SiameseNet(ModelConfig(input_size=TINY_INPUT)).eval()


def test_embeddings_are_unit_norm_and_cache_is_reused(sample, model, tmp_path):
    records = load_catalog(sample).records[:6]
    cache = tmp_path / "emb"
    first = embed_records(model, records, cache, batch_size=4, progress=False)
    assert first.computed == 6 and first.embeddings.shape == (6, model.dim)
    assert np.allclose(np.linalg.norm(first.embeddings, axis=1), 1.0, atol=1e-4)
    second = embed_records(model, records, cache, batch_size=4, progress=False)
    assert second.computed == 0  # everything came from the cache
    assert np.array_equal(first.embeddings, second.embeddings)
    # a photo replaced on disk (new mtime) is recomputed, the others are not
    st = os.stat(records[2].path)
    os.utime(records[2].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert embed_records(model, records, cache, batch_size=4, progress=False).computed == 1


def test_cache_with_another_fingerprint_is_stale(tmp_path):
    c1 = FeatureCache(tmp_path / "c", "model-a")
    c1.add({"k1": {"embedding": np.ones(3, np.float32)}})
    c1.add({"k3": {"embedding": np.full(3, 3, np.float32)}})  # a second shard
    got = c1.get(["k1", "k2", "k3"])
    assert set(got) == {"k1", "k3"} and got["k3"]["embedding"][0] == 3
    c2 = FeatureCache(tmp_path / "c", "model-b")
    assert c2.get(["k1"]) == {}
    c2.add({"k2": {"embedding": np.zeros(3, np.float32)}})
    assert c2.keys() == {"k2"} and c1.keys() == set()  # the stale shards were removed
    assert len(list((tmp_path / "c").iterdir())) == 1  # the atomic write left no temporary file


def test_cache_ignores_a_half_written_shard(tmp_path):
    c = FeatureCache(tmp_path / "c", "m")
    c.add({"k1": {"x": np.ones(2)}})
    (tmp_path / "c" / "shard-99999999999999999999-1.h5").write_bytes(b"truncated")
    assert set(c.get(["k1"])) == {"k1"}


def test_an_unreadable_shard_is_skipped_and_never_deleted(tmp_path, monkeypatch):
    c = FeatureCache(tmp_path / "c", "m")
    c.add({"k1": {"x": np.ones(2)}})
    (shard,) = (tmp_path / "c").glob("shard-*.h5")
    real_open = h5py.File

    def flaky(path, *a, **kw):  # a transient I/O error on the one shard
        if Path(path) == shard:
            raise OSError(5, "Input/output error")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(h5py, "File", flaky)
    assert c.get(["k1"]) == {}  # missed, not an error
    c.add({"k2": {"x": np.zeros(2)}})
    monkeypatch.undo()
    assert shard.exists() and set(c.get(["k1", "k2"])) == {"k1", "k2"}


def test_shards_are_merged_when_they_pile_up(tmp_path):
    c = FeatureCache(tmp_path / "c", "m")
    for k in range(cache_module.MAX_SHARDS):
        c.add({f"k{k}": {"x": np.full(3, k, np.float32)}})
    assert len(list((tmp_path / "c").glob("shard-*.h5"))) == cache_module.MAX_SHARDS
    c.add({"last": {"x": np.full(3, -1, np.float32)}})  # one too many: the smallest are merged
    shards = list((tmp_path / "c").glob("shard-*.h5"))
    assert len(shards) == cache_module.MAX_SHARDS // 2
    got = c.get([f"k{k}" for k in range(cache_module.MAX_SHARDS)] + ["last"])
    assert len(got) == cache_module.MAX_SHARDS + 1 and got["k7"]["x"][0] == 7 and got["last"]["x"][0] == -1
    assert not list((tmp_path / "c").glob("*.tmp"))


def test_undecodable_photos_are_remembered_not_retried(sample, model, tmp_path, caplog):
    records = load_catalog(sample).records[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    from dataclasses import replace

    records = [records[0], replace(records[1], path=bad)]
    cache = tmp_path / "emb"
    first = embed_records(model, records, cache, batch_size=2, progress=False)
    assert len(first.skipped) == 1 and record_key(records[1]) in FeatureCache(cache, "").unreadable()
    caplog.clear()
    with caplog.at_level("WARNING"):
        second = embed_records(model, records, cache, batch_size=2, progress=False)
    assert second.computed == 0 and list(second.ok) == [0] and "bad.jpg" in second.skipped[0][1]
    assert not [r for r in caplog.records if "bad.jpg" in r.getMessage()]  # not warned again by this process
    from siamese import embed

    embed._NAMED_UNREADABLE.clear()  # as a later command starts
    caplog.clear()
    with caplog.at_level("WARNING"):
        embed_records(model, records, cache, batch_size=2, progress=False)
    named = [r.getMessage() for r in caplog.records if "bad.jpg" in r.getMessage()]
    assert len(named) == 1 and "found unreadable before" in named[0]  # named once, not retried
    bad.write_bytes(sample.parent.joinpath(records[0].path).read_bytes())  # fixed: new size, new key
    third = embed_records(model, records, cache, batch_size=2, progress=False)
    assert third.computed == 1 and list(third.ok) == [0, 1]


def test_a_transient_read_error_is_not_remembered(tmp_path, monkeypatch):
    from core import images

    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"x" * 10)

    def eio(*a, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(images.Image, "open", eio)
    with pytest.raises(ImageError) as e:
        images.load_image(photo)
    assert not e.value.permanent
    monkeypatch.undo()
    with pytest.raises(ImageError) as e:
        images.load_image(photo)  # ten bytes that are no image: that will not pass
    assert e.value.permanent


def test_unreadable_photo_is_skipped_and_named(sample, model, tmp_path):
    records = load_catalog(sample).records[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    from dataclasses import replace

    records = records[:1] + [replace(records[1], path=bad)] + records[2:]
    res = embed_records(model, records, None, batch_size=2, progress=False)
    assert list(res.ok) == [0, 2] and len(res.skipped) == 1 and "bad.jpg" in res.skipped[0][1]


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_faiss_matches_brute_force_cosine():
    rng = np.random.default_rng(0)
    g, q = _unit(rng, 500, 64), _unit(rng, 40, 64)
    scores, idx = EmbeddingIndex(g).search(q, 10)
    brute = q @ g.T
    expected = np.argsort(-brute, axis=1)[:, :10]
    assert np.array_equal(idx, expected)
    assert np.allclose(scores, np.take_along_axis(brute, expected, axis=1), atol=1e-5)


def test_viewpoint_restricts_search():
    rng = np.random.default_rng(1)
    g = _unit(rng, 60, 16)
    views = ["left"] * 30 + ["right"] * 30
    index = EmbeddingIndex(g, views)
    q = g[[0, 45, 5]]
    scores, idx = index.search(q, 5, ["right", "left", None])
    assert all(views[i] == "right" for i in idx[0])
    assert all(views[i] == "left" for i in idx[1])
    assert idx[2][0] == 5  # unknown viewpoint meets every gallery photo, itself first
    assert idx[1][0] != 45 and 45 not in idx[1]
    # a gallery without viewpoints: a query of known viewpoint meets every photo (it used to meet none)
    for unknown in (None, [None] * 60, [""] * 60):
        scores, idx = EmbeddingIndex(g, unknown).search(q, 5, ["right", "left", None])
        assert list(idx[:, 0]) == [0, 45, 5] and (idx >= 0).all()


def test_meets_is_the_rule_search_follows():
    """`meets(view)` (the photos keypoint votes may propose) is exactly what `search` can return:
    a gallery of left, right and unknown-viewpoint photos, queries of each view, none, and one the
    gallery lacks (which meets only the unknown-viewpoint photos)."""
    rng = np.random.default_rng(3)
    g = _unit(rng, 30, 8)
    views = ["left"] * 12 + ["right"] * 12 + [None] * 6
    index = EmbeddingIndex(g, views)
    for view, expected in (("left", 18), ("right", 18), (None, 30), ("top", 6)):
        _, idx = index.search(g[:1], 30, [view])
        found = set(idx[0][idx[0] >= 0].tolist())
        assert found == set(np.flatnonzero(index.meets(view)).tolist()) and len(found) == expected
    assert EmbeddingIndex(g).meets("left").all()


def test_individual_means_by_viewpoint_subset_and_hidden_photos():
    """Known answers: the cosine to the normalised sum of the candidate's individual's photos of the
    same viewpoint, over a gallery subset, the query's own photos left out (once, even if named twice)."""
    e = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    ids = ["a", "a", "a", "b", "b", "a"]
    views = ["left", "left", "right", "left", None, "left"]
    means = IndividualMeans(e, ids, views)
    q = np.array([1.0, 0.0, 0.0])

    def cos(rows):
        m = e[rows].sum(axis=0)
        return float(m @ q / np.linalg.norm(m))
    # photo 0's group: a/left = photos 0, 1, 5; photo 2: a/right alone; photo 3: b/left; photo 4: b/no view
    np.testing.assert_allclose(means.cosines(q, [0, 2, 3, 4, 1]),
                               [cos([0, 1, 5]), cos([2]), cos([3]), cos([4]), cos([0, 1, 5])], atol=1e-9)
    # the query is photo 0: it leaves a/left's mean, its photos keep their place
    np.testing.assert_allclose(means.cosines(q, [1, 3, 5], hidden=[0, 0]), [cos([1, 5]), cos([3]), cos([1, 5])],
                               atol=1e-9)
    # a subset without photo 5 (a calibration fold); a hidden photo outside the subset changes nothing
    subset = np.array([0, 1, 2, 3, 4])
    np.testing.assert_allclose(means.cosines(q, [1, 3], hidden=[0], members=subset), [cos([1]), cos([3])], atol=1e-9)
    np.testing.assert_allclose(means.cosines(q, [1], hidden=[5], members=subset), [cos([0, 1])], atol=1e-9)
    # back to the whole gallery (the subset's sums are not reused for it)
    np.testing.assert_allclose(means.cosines(q, [1]), [cos([0, 1, 5])], atol=1e-9)
    assert means.cosines(q, []).shape == (0,)


def test_large_galleries_get_an_ivf_index_with_high_recall():
    """Above exact_max the index is IVF; on clustered data (individuals: photos near a centre) its
    top-10 agrees with exact search for nearly every query."""
    rng = np.random.default_rng(2)
    centres = _unit(rng, 300, 32)
    g = centres[rng.integers(0, 300, 6000)] + 0.3 * rng.standard_normal((6000, 32)).astype(np.float32) / 32 ** 0.5
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[:200] + 0.01 * rng.standard_normal((200, 32)).astype(np.float32)
    exact = EmbeddingIndex(g)
    ivf = EmbeddingIndex(g, exact_max=1000)
    assert exact.exact and not ivf.exact
    _, e_idx = exact.search(q, 10)
    _, i_idx = ivf.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(e_idx, i_idx)])
    assert recall > 0.95
    assert build_index(g, exact_max=1000).nprobe == 128


def test_query_viewpoints_against_a_gallery_without_any_are_said_unused(caplog):
    """A gallery built without a viewpoint column compares every query with all of it: a queries CSV
    that gives viewpoints is told so, once."""
    import logging
    from types import SimpleNamespace

    from engine.pipeline import Engine

    engine = SimpleNamespace(index=EmbeddingIndex(np.eye(3, dtype=np.float32), ["", "", ""]), _warned_views=set())
    with caplog.at_level(logging.WARNING, logger="engine.pipeline"):
        Engine.warn_unknown_views(engine, [None, None])  # no viewpoints asked: nothing to say
        assert not caplog.text
        Engine.warn_unknown_views(engine, ["left", None])
        Engine.warn_unknown_views(engine, ["right"])
    assert caplog.text.count("the queries give viewpoints but no gallery photo has one") == 1


def _animals(rng, n_ind, per, d=32, signal=8, nuisance=1.0):
    """Embeddings whose first `signal` dimensions tell individuals apart a little and whose others
    change a lot from one photo of an animal to the next (light, pose, framing): unit rows, ids."""
    centre = np.concatenate([rng.normal(0, 1.0, (n_ind, signal)), np.zeros((n_ind, d - signal))], 1)
    x = np.repeat(centre, per, axis=0)
    x += np.concatenate([rng.normal(0, 0.15, (len(x), signal)), rng.normal(0, nuisance, (len(x), d - signal))], 1)
    ids = [f"a{i}" for i in range(n_ind) for _ in range(per)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), ids


def test_embedding_whitening_finds_the_right_animal_where_the_cosine_does_not():
    """Known answer: fitted on other animals' photos (the training individuals), the whitening shrinks
    the directions in which one animal's photos differ, so a new photo's nearest photo is of the same
    animal for nearly every query, where the raw cosine finds it for few."""
    from siamese.index import fit_embedding_whitening

    rng = np.random.default_rng(0)
    train, train_ids = _animals(rng, 60, 5)
    w = fit_embedding_whitening(train, train_ids, [None] * len(train_ids))
    assert w is not None and w.correspondences == 300 and w.P.shape == (32, 32)
    # other animals, two photos each: the first is the gallery, the second the query
    x, ids = _animals(np.random.default_rng(1), 100, 2)
    gallery, queries = x[0::2], x[1::2]

    def top1(g, q):
        return float(np.mean(np.argmax(q @ g.T, axis=1) == np.arange(len(q))))

    raw, white = top1(gallery, queries), top1(w.apply(gallery), w.apply(queries))
    assert raw < 0.3 and white > 0.9, (raw, white)  # 0.17 and 0.98
    assert np.allclose(np.linalg.norm(w.apply(queries), axis=1), 1, atol=1e-5)


def test_embedding_whitening_groups_by_individual_and_viewpoint_and_needs_enough_photos():
    from siamese.index import fit_embedding_whitening

    rng = np.random.default_rng(2)
    x, ids = _animals(rng, 12, 2)
    # one photo per individual and viewpoint: no group of two, nothing to learn from
    views = ["left", "right"] * 12
    assert fit_embedding_whitening(x, ids, views) is None
    # the same photos as one viewpoint: 12 groups of two, 24 photos >= 20
    w = fit_embedding_whitening(x, ids, [None] * 24)
    assert w is not None and w.correspondences == 24
    assert fit_embedding_whitening(x[:18], ids[:18], [None] * 18) is None  # 18 photos < 20


@pytest.mark.parametrize("rewrite_merged", [True, False])
def test_a_key_written_again_keeps_its_latest_entry_through_a_merge(tmp_path, rewrite_merged):
    """An entry written again (a pair result verified anew) wins over the old one whether the merge
    takes both shards (newest first) or only the old one (a newer unmerged shard holds the key)."""
    c = FeatureCache(tmp_path / "c", "m")
    c.add({"k": {"x": np.zeros(3, np.float32)}})
    for i in range(cache_module.MAX_SHARDS - 2):
        c.add({f"o{i}": {"x": np.full(3, i, np.float32)}})
    # the new entry in a small shard (merged with the old) or in a large one (left as it is)
    c.add({"k": {"x": np.full(3 if rewrite_merged else 50000, 7, np.float32)}})
    assert c.get(["k"])["k"]["x"][0] == 7
    c.add({"last": {"x": np.full(3, -1, np.float32)}})  # one too many: the smallest are merged
    assert len(list((tmp_path / "c").glob("shard-*.h5"))) < cache_module.MAX_SHARDS
    assert c.get(["k"])["k"]["x"][0] == 7 and c.get(["o3"])["o3"]["x"][0] == 3
