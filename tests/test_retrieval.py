"""Embedding cache, faiss retrieval against brute force, viewpoint-restricted search."""
import os

import numpy as np
import pytest

from engine.cache import FeatureCache
from engine.catalog import load_catalog
from siamese.embed import embed_records
from siamese.index import EmbeddingIndex
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
