"""Keypoint votes (keypoints.votes): LNBNN weights against a brute-force count, the photos a query
may meet, and the saved index."""
from pathlib import Path

import faiss
import numpy as np
import pytest

from core.catalog import Record
from keypoints.features import Keypoints
from keypoints.inlier_weights import InlierWeights, rows_from
from keypoints.votes import VoteConfig, VoteIndex


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _gallery(rng, photos=12, per_photo=40, d=128):
    desc = _unit(np.abs(rng.normal(size=(photos * per_photo, d))))
    return desc, np.repeat(np.arange(photos), per_photo)


def _keypoints(desc, rng, size=(100, 200)):
    return Keypoints((rng.random((len(desc), 2)) * [size[1], size[0]]).astype(np.float32), desc, size)


def brute_force_votes(desc, owner, n_photos, query, allowed, k, weight=lambda i, j: 1.0):
    """The documented rule, spelled out: the k nearest allowed descriptors of each query
    descriptor vote for their photos with d_(k+1) - d_j (times `weight(query row, gallery row)`),
    one vote per photo (its best)."""
    keep = np.flatnonzero(allowed[owner])
    out = np.zeros(n_photos)
    for i, q in enumerate(query):
        dist = np.linalg.norm(desc[keep] - q, axis=1)
        near = np.argsort(dist, kind="stable")[: k + 1]
        best = {}
        for j in near[:k]:
            p = owner[keep[j]]
            best[p] = max(best.get(p, 0.0), (dist[near[k]] - dist[j]) * weight(i, keep[j]))
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

    kps = [_keypoints(desc[owner == i], rng) for i in range(6)]

    def get_desc(part):
        calls.append(len(part))
        # photo 2 cannot be read: no keypoints
        return [kps[int(r.individual_id)] if r.individual_id != "2" else kps[2].top(0) for r in part]

    cfg = VoteConfig(nprobe=1000)
    first = VoteIndex.from_store(records, get_desc, cfg, tmp_path, "settings")
    assert calls == [6] and not first.counts[2] and first.counts[3] == 50
    query = desc[owner == 4][:10]
    again = VoteIndex.from_store(records, get_desc, cfg, tmp_path, "settings")
    assert calls == [6]  # loaded from the run's cache, not rebuilt
    np.testing.assert_array_equal(again.votes(query, np.ones(6, bool)), first.votes(query, np.ones(6, bool)))
    # the keypoints' positions are kept with it, as a share of each photo's width and height
    np.testing.assert_allclose(again.xy[again.owner == 4], kps[4].xy / [200, 100], rtol=1e-6)
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
        return [_keypoints(desc[owner == int(r.individual_id)], rng) if int(r.individual_id) in available else None
                for r in part]

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


def _pattern_model(d: int) -> InlierWeights:
    """A model of inliers that knows one thing: a correspondence on a descriptor whose dimension 0 is
    high is an animal's own pattern (probability near 1), one whose dimension 1 is high a part every
    animal shares (near 0)."""
    rng = np.random.default_rng(7)
    desc = np.abs(rng.normal(0, 0.05, (400, d)))
    own = np.arange(400) % 2 == 0
    desc[own, 0] += rng.uniform(0.5, 1.0, own.sum())  # a spread of values: a split anywhere between the kinds
    desc[~own, 1] += rng.uniform(0.5, 1.0, (~own).sum())
    desc = _unit(desc)
    X = rows_from(desc, desc, rng.random((400, 2)), rng.random((400, 2)))
    return InlierWeights.fit(X, own.astype(np.float32))


def test_votes_weighted_by_the_model_of_inliers_follow_the_pattern_not_the_shared_parts(tmp_path):
    """Photo 0 shares many parts with the query (a head, a bush: descriptors every animal has), photo 1
    a little of the query's own pattern: plain votes prefer photo 0, votes weighted by the model of
    inliers (to the power VoteConfig.weight_power) photo 1; both equal the rule spelled out."""
    rng = np.random.default_rng(4)
    d = 16
    noise = _unit(np.abs(rng.normal(size=(8 * 30, d))))  # photos 2-9: neither
    shared = _unit(np.abs(rng.normal(0, 0.05, (30, d))) + np.eye(1, d, 1))
    pattern = _unit(np.abs(rng.normal(0, 0.05, (8, d))) + np.eye(1, d, 0))
    desc = np.concatenate([shared, _unit(np.concatenate([pattern, noise[:22]])), noise])
    owner = np.repeat(np.arange(10), 30)[: len(desc)]
    n = int(owner.max()) + 1
    xy = rng.random((len(desc), 2)).astype(np.float32)
    query = _unit(np.concatenate([shared + 0.01 * rng.normal(size=shared.shape),
                                  pattern + 0.01 * rng.normal(size=pattern.shape)]))
    query_xy = rng.random((len(query), 2)).astype(np.float32)
    model = _pattern_model(d)
    everything = np.ones(n, bool)
    for cfg in (VoteConfig(k=3), VoteConfig(k=3, exact_max=0, nprobe=10_000)):  # flat and IVF
        index = VoteIndex(desc, owner, n, cfg, xy=xy)
        plain = index.votes(query, everything)
        weighted = index.votes(query, everything, query_xy, model)
        assert np.argmax(plain) == 0 and np.argmax(weighted) == 1

        def weight(i, j):
            row = rows_from(query[i:i + 1], desc[j:j + 1], query_xy[i:i + 1], xy[j:j + 1])
            return model.predict(row)[0] ** cfg.weight_power
        np.testing.assert_allclose(weighted, brute_force_votes(desc, owner, n, query, everything, 3, weight),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(plain, brute_force_votes(desc, owner, n, query, everything, 3), rtol=1e-4,
                                   atol=1e-6)
    # an index without positions cannot weigh its votes (it says so); one saved without them (by an
    # engine before weighted votes) is built again with them
    with pytest.raises(ValueError, match="no keypoint positions"):
        VoteIndex(desc, owner, n, VoteConfig(k=3)).votes(query, everything, query_xy, model)
    records = [Record(image=f"{i}.jpg", path=Path(f"/nowhere/{i}.jpg"), individual_id=str(i), key=f"k{i}")
               for i in range(n)]
    kps = [Keypoints(xy[owner == i] * [200, 100], desc[owner == i], (100, 200)) for i in range(n)]
    built = VoteIndex.from_store(records, lambda part: [kps[int(r.individual_id)] for r in part], VoteConfig(k=3),
                                 tmp_path)
    (saved,) = tmp_path.glob("votes-*.xy.npy")
    saved.unlink()
    calls = []
    again = VoteIndex.from_store(records, lambda part: calls.append(1) or [kps[int(r.individual_id)] for r in part],
                                 VoteConfig(k=3), tmp_path)
    assert calls and saved.is_file()
    np.testing.assert_allclose(again.votes(query, everything, query_xy, model),
                               built.votes(query, everything, query_xy, model), rtol=1e-6)


def test_each_weighted_vote_reads_its_own_correspondence_through_an_approximate_search():
    """The rows the model reads pair each query descriptor (and its position) with the gallery descriptor
    (and position) it voted through, also where an IVF search probing one list leaves some query
    descriptors without k + 1 neighbours (no vote), where some photos are hidden, and where the query
    has more descriptors than `per_photo` (the strongest vote)."""
    rng = np.random.default_rng(5)
    desc, owner = _gallery(rng, photos=10, per_photo=40, d=16)
    xy = rng.random((len(desc), 2)).astype(np.float32)
    query = _unit(desc[rng.choice(len(desc), 60, replace=False)] + 0.05 * rng.normal(size=(60, 16)))
    query_xy = rng.random((60, 2)).astype(np.float32)
    cfg = VoteConfig(k=5, per_photo=50, exact_max=0, nprobe=1, lists=2.0)
    index = VoteIndex(desc, owner, 10, cfg, xy=xy)
    allowed = np.zeros(10, bool)
    allowed[[0, 3]] = True  # most photos hidden: some probed lists hold fewer than k + 1 allowed
    q_pos = {query[i].tobytes(): query_xy[i] for i in range(cfg.per_photo)}  # the strongest 50 vote
    g_pos = {desc[j].tobytes(): (xy[j], owner[j]) for j in range(len(desc))}
    seen = []

    class Checking:  # a model that checks each row's pairing, and weighs nothing
        def predict(self, rows):
            for r in rows:
                dq, dg = r[:16], r[16:32]
                assert np.array_equal(r[32:34], q_pos[dq.tobytes()])
                pos, photo = g_pos[dg.tobytes()]
                assert np.array_equal(r[34:36], pos) and allowed[photo]
                assert np.isclose(r[36], abs(r[32] - 0.5)) and np.isclose(r[37], abs(r[34] - 0.5))
            seen.append(len(rows))
            return np.ones(len(rows))

    weighted = index.votes(query, allowed, query_xy, Checking())
    assert seen and 0 < seen[0] < cfg.per_photo * cfg.k  # some descriptors had no vote through one list
    np.testing.assert_allclose(weighted, index.votes(query, allowed))  # weight 1: the plain votes


def test_votes_are_weighted_only_where_asked_counted_and_modelled():
    """calibration.json's record of the vote weighting: on by calibrate's default, off with --votes 0 or
    without a model of inliers; a calibration from before the setting reads as plain votes (False)."""
    from engine.config import MatchConfig
    from engine.pipeline import fitted_settings, match_settings_of

    now = match_settings_of(MatchConfig(), votes_available=True, vote_weights_available=True)
    assert now["vote_weights"] is True
    assert match_settings_of(MatchConfig(votes=0), True, True)["vote_weights"] is False
    assert match_settings_of(MatchConfig(), True, False)["vote_weights"] is False
    assert match_settings_of(MatchConfig(vote_weights=False), True, True)["vote_weights"] is False
    before = {k: v for k, v in now.items() if k != "vote_weights"}
    assert fitted_settings(before, now)["vote_weights"] is False
