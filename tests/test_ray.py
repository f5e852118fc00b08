"""--executor ray on a local Ray with 2 CPUs: the same predictions, scores and caches as the local
executor, and a worker killed mid-task costs a retry, not the run. Ray is a dependency: never skipped."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from core.executor import _CURRENT, KILL_ONCE_ENV
from engine.synthetic import make_dataset, split_open_set
from tests.test_engine_chain import invoke

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray of 2 CPUs for this module; the kill hook's marker exists (no kill) until a test
    removes it."""
    import ray

    marker = tmp_path_factory.mktemp("hook") / "killed"
    marker.write_text("not yet")
    os.environ[KILL_ONCE_ENV] = str(marker)
    from core.executor import ExecutorConfig, use_executor

    use_executor(ExecutorConfig(kind="ray", num_cpus=2))
    yield marker
    _CURRENT.clear()
    os.environ.pop(KILL_ONCE_ENV, None)
    ray.shutdown()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("raysample")
    catalog = make_dataset(root / "sample", n_individuals=10, photos_per_individual=4, seed=21, size=(96, 128))
    gallery, qdir, truth = split_open_set(catalog, root / "split", n_unseen=2, seed=21)
    return root, gallery, qdir, truth


def build(root: Path, gallery: Path, qdir: Path, executor: str) -> Path:
    run = root / f"run_{executor}"
    args = ["--executor", executor]
    invoke("train-siamese", "--catalog", gallery, "--out", run, "--epochs", 0, "--input-size", "64x96",
           "--batch-size", 8, "--heldout-fraction", 0.4, *args, "-q")
    invoke("train-verifier", "--run", run, *args, "-q")
    invoke("calibrate", "--run", run, "--folds", 2, *args, "-q")
    invoke("match", qdir, "--run", run, "--out", root / f"pred_{executor}.csv", *args, "-q")
    return run


def cache_entries(folder: Path) -> dict:
    """Every entry of every shard of a feature cache, by key (shard layout may differ)."""
    out = {}
    for shard in sorted(folder.glob("*.h5")):
        with h5py.File(shard, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    out[name] = obj[()]
            f.visititems(visit)
    return out


@pytest.fixture(scope="module")
def runs(ray_local, sample):
    """The whole chain run once with each executor, on the same sample and seed."""
    root, gallery, qdir, _ = sample
    return build(root, gallery, qdir, "local"), build(root, gallery, qdir, "ray")


def test_ray_gives_the_local_results(runs, sample):
    root = sample[0]
    local, remote = runs
    assert (root / "pred_local.csv").read_bytes() == (root / "pred_ray.csv").read_bytes()
    # the evidence JSON: same scores and inliers (paths differ only by the run folder)
    a = (root / "pred_local.json").read_text().replace(str(local), "RUN")
    b = (root / "pred_ray.json").read_text().replace(str(remote), "RUN")
    assert a == b
    with h5py.File(local / "gallery.h5") as f, h5py.File(remote / "gallery.h5") as g:
        np.testing.assert_array_equal(f["embeddings"][()], g["embeddings"][()])
    for cache in ("embeddings", "keypoints", "pairs"):
        x, y = cache_entries(local / "cache" / cache), cache_entries(remote / "cache" / cache)
        assert x.keys() == y.keys() and x, cache
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{cache}/{k}")
    assert (local / "calibration.json").read_text() == (remote / "calibration.json").read_text()


def test_a_killed_worker_costs_a_retry(ray_local, runs, sample, tmp_path):
    root, gallery, qdir, _ = sample
    run = tmp_path / "run"
    shutil.copytree(root / "run_local", run)
    shutil.rmtree(run / "cache" / "pairs")  # verification must run again, as Ray tasks
    ray_local.unlink()  # the next task kills its own worker once
    invoke("match", qdir, "--run", run, "--out", tmp_path / "pred.csv", "--executor", "ray", "-q")
    assert ray_local.is_file() and ray_local.read_text().isdigit()  # a worker died (its pid)
    assert (tmp_path / "pred.csv").read_bytes() == (root / "pred_local.csv").read_bytes()
    assert not list((run / "cache").rglob("*.tmp*"))  # nothing half-written in a cache


def test_evaluate_and_enroll_under_ray(ray_local, runs, sample, tmp_path):
    root, _, qdir, truth = sample
    outputs = {}
    for ex in ("local", "ray"):
        run = tmp_path / ex
        shutil.copytree(runs[ex == "ray"], run)
        shutil.rmtree(run / "cache" / "pairs")
        table = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--executor", ex, "-q")
        new = make_dataset(tmp_path / f"new_{ex}", n_individuals=1, photos_per_individual=3, seed=99,
                           size=(96, 128))
        summary = invoke("enroll", "--catalog", new, "--run", run, "--executor", ex, "-q")
        assert "enrolled 3 photos (1 new individual" in summary
        with h5py.File(run / "gallery.h5") as f:
            outputs[ex] = ([line for line in table.splitlines() if "second" not in line and str(run) not in line], f["embeddings"][()],
                           len(cache_entries(run / "cache" / "keypoints")))
    assert outputs["local"][0] == outputs["ray"][0]  # the same metrics, stage by stage
    np.testing.assert_array_equal(outputs["local"][1], outputs["ray"][1])
    assert outputs["local"][2] == outputs["ray"][2]  # the new photos' keypoints cached either way
