"""Keypoint votes (keypoints.votes): LNBNN weights against a brute-force count, the photos a query
may meet, and the saved index."""
from pathlib import Path

import faiss
import numpy as np

from core.catalog import Record
from keypoints.votes import VoteConfig, VoteIndex


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _gallery(rng, photos=12, per_photo=40, d=128):
    desc = _unit(np.abs(rng.normal(size=(photos * per_photo, d))))
    return desc, np.repeat(np.arange(photos), per_photo)


def brute_force_votes(desc, owner, n_photos, query, allowed, k):
    """The documented rule, spelled out: the k nearest allowed descriptors of each query
    descriptor vote for their photos with d_(k+1) - d_j, one vote per photo (its best)."""
    keep = np.flatnonzero(allowed[owner])
    out = np.zeros(n_photos)
    for q in query:
        dist = np.linalg.norm(desc[keep] - q, axis=1)
        near = np.argsort(dist, kind="stable")[: k + 1]
        best = {}
        for j in near[:k]:
            p = owner[keep[j]]
            best[p] = max(best.get(p, 0.0), dist[near[k]] - dist[j])
        for p, w in best.items():
            out[p] += w
    return out


def test_votes_match_a_brute_force_count_and_respect_the_allowed_photos():
    rng = np.random.default_rng(0)
    desc, owner = _gallery(rng)
    # searching every IVF list makes the index exact, so the votes must equal the brute-force ones
    cfg = VoteConfig(k=4, nprobe=10_000, exact_max=0)
    index = VoteIndex(desc, owner, 12, cfg)
    query = _unit(desc[owner == 3][:25] + 0.02 * rng.normal(size=(25, 128)))  # photo 3, seen again
    everything = np.ones(12, bool)
    votes = index.votes(query, everything)
    np.testing.assert_allclose(votes, brute_force_votes(desc, owner, 12, query, everything, 4), rtol=1e-4, atol=1e-5)
    assert isinstance(index.index, faiss.IndexIVF)
    exact = VoteIndex(desc, owner, 12, VoteConfig(k=4))  # a small gallery: a flat index, the same votes
    assert not isinstance(exact.index, faiss.IndexIVF)
    np.testing.assert_allclose(exact.votes(query, everything), votes, rtol=1e-4, atol=1e-5)
    assert int(np.argmax(votes)) == 3 and votes[3] > 3 * np.sort(votes)[-2]
    # photo 3 hidden (a calibration fold, the query's own photo): no vote for it, and the others'
    # votes are those of a gallery without it (it neither takes a neighbour's place nor the normaliser's)
    allowed = everything.copy()
    allowed[3] = False
    hidden = index.votes(query, allowed)
    assert hidden[3] == 0
    np.testing.assert_allclose(hidden, brute_force_votes(desc, owner, 12, query, allowed, 4), rtol=1e-4, atol=1e-5)


def test_too_few_allowed_descriptors_or_none_in_the_query_give_no_votes():
    rng = np.random.default_rng(1)
    desc, owner = _gallery(rng, photos=3, per_photo=2)
    index = VoteIndex(desc, owner, 3, VoteConfig(k=5))
    assert index.votes(desc[:4], np.ones(3, bool)).any()  # 6 descriptors: k + 1
    assert not index.votes(desc[:4], np.array([True, True, False])).any()  # 4: no (k+1)-th neighbour
    assert not index.votes(np.zeros((0, 128), np.float32), np.ones(3, bool)).any()


def test_the_index_is_saved_and_rebuilt_only_when_the_gallery_changes(tmp_path):
    rng = np.random.default_rng(2)
    desc, owner = _gallery(rng, photos=6, per_photo=50)
    records = [Record(image=f"{i}.jpg", path=Path(f"/nowhere/{i}.jpg"), individual_id=str(i), key=f"k{i}")
               for i in range(6)]
    calls = []

    def get_desc(part):
        calls.append(len(part))
        # photo 2 cannot be read: no descriptors
        return [desc[owner == int(r.individual_id)] if r.individual_id != "2" else desc[:0] for r in part]

    cfg = VoteConfig(nprobe=1000)
    first = VoteIndex.from_store(records, get_desc, cfg, tmp_path, "settings")
    assert calls == [6] and not first.counts[2] and first.counts[3] == 50
    query = desc[owner == 4][:10]
    again = VoteIndex.from_store(records, get_desc, cfg, tmp_path, "settings")
    assert calls == [6]  # loaded from the run's cache, not rebuilt
    np.testing.assert_array_equal(again.votes(query, np.ones(6, bool)), first.votes(query, np.ones(6, bool)))
    VoteIndex.from_store(records[:5], get_desc, cfg, tmp_path, "settings")  # the gallery changed
    VoteIndex.from_store(records[:5], get_desc, cfg, tmp_path, "other settings")
    assert calls == [6, 5, 5] and len(list(tmp_path.glob("votes-*.faiss"))) == 1  # the current one only
    assert not list(tmp_path.glob("*.tmp*"))


def test_an_index_missing_photos_for_now_is_not_saved(tmp_path):
    """A photo whose keypoints are missing for now (None: not found, a read error that may pass)
    gets no votes in this process, and the index is built again next time rather than saved."""
    rng = np.random.default_rng(3)
    desc, owner = _gallery(rng, photos=4, per_photo=30)
    records = [Record(image=f"{i}.jpg", path=Path(f"/nowhere/{i}.jpg"), individual_id=str(i), key=f"k{i}")
               for i in range(4)]
    available = {0, 1, 2}

    def get_desc(part):
        return [desc[owner == int(r.individual_id)] if int(r.individual_id) in available else None for r in part]

    partial = VoteIndex.from_store(records, get_desc, VoteConfig(), tmp_path, "settings")
    assert not partial.counts[3] and not list(tmp_path.glob("votes-*"))
    available.add(3)
    whole = VoteIndex.from_store(records, get_desc, VoteConfig(), tmp_path, "settings")
    assert whole.counts[3] == 30 and len(list(tmp_path.glob("votes-*.faiss"))) == 1


def test_voted_photos_alternate_with_the_embeddings_ranking_for_verification():
    """The V verified photos: the pre-score ranking and the voted photos in turn, each photo once."""
    from engine.pipeline import alternate

    order = np.array([0, 1, 2, 3, 4])
    assert alternate(order, np.array([3, 1])).tolist() == [0, 3, 1, 2, 4]
    assert alternate(order, np.array([0, 4, 2])).tolist() == [0, 1, 4, 2, 3]
    assert alternate(order, np.array([], np.int64)).tolist() == order.tolist()
