"""Kill and resume: SIGKILL at random moments, several times per command, then resume or rerun.

One uninterrupted chain (train-siamese, train-verifier, calibrate, match) is the reference. A second
chain with the same seed is killed 3 times per command at seeded random moments of that command's
reference duration; after every kill each file of the run folder must read (JSON, HDF5 caches, the
checkpoint), and the final outputs must equal the reference's: the training history, the gallery
embeddings, the verifier, the calibration and the predictions, byte for byte where they are files.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from engine.synthetic import make_dataset, split_open_set

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KILLS = 3
TIMING_KEYS = {"train_s", "mining_s", "images_per_s", "seconds", "train_seconds", "embed_images_per_second",
               "ms_per_pair", "fit_seconds"}


def cli(args, log: Path, kill_after: float | None = None) -> int:
    """Run `cli.py ARGS`; with kill_after, SIGKILL it then (-9; its exit code if it had finished)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "cli.py", *map(str, args), "-q"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
        if kill_after is None:
            return proc.wait(timeout=900)
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return -9


def check_readable(run: Path) -> None:
    """No corrupt file: every JSON parses, every HDF5 file opens, the checkpoint loads."""
    for f in run.rglob("*"):
        if not f.is_file() or ".tmp" in f.name:
            continue  # a temp file of the killed write: never read, never renamed into place
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".h5":
            with h5py.File(f, "r") as h:
                list(h.keys())
        elif f.name == "checkpoint.pt":
            torch.load(f, weights_only=False)


def without_timing(x):
    if isinstance(x, dict):
        return {k: without_timing(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [without_timing(v) for v in x]
    return x


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    catalog = make_dataset(root / "sample", n_individuals=14, photos_per_individual=4, seed=11, size=(96, 128))
    gallery, qdir, _ = split_open_set(catalog, root / "split", n_unseen=2, seed=11)
    return root, gallery, qdir


def steps(gallery, qdir, run: Path):
    # --max-minutes 0: under a time budget the schedule follows the clock, so no two runs share bits.
    # --precision fp32: `auto` measures bf16 against fp32 on a CPU with native bf16, and timing noise
    # may choose differently for the reference and the killed chain (a resume keeps its run's choice)
    fp32 = ["--precision", "fp32"]
    return [
        ("train-siamese", ["train-siamese", "--catalog", gallery, "--out", run, "--epochs", 4, "--input-size", "64x96",
                           "--batch-size", 16, "--heldout-fraction", 0.5, "--seed", 3, "--max-minutes", 0, *fp32],
         ["--resume"]),
        ("train-verifier", ["train-verifier", "--run", run, *fp32], []),
        ("calibrate", ["calibrate", "--run", run, "--folds", 3, *fp32], []),
        ("match", ["match", qdir, "--run", run, "--out", run.parent / f"{run.name}_pred.csv", *fp32], []),
    ]


def test_killed_and_resumed_equals_uninterrupted(data):
    root, gallery, qdir = data
    ref, killed = root / "ref", root / "killed"
    durations = {}
    for name, args, _ in steps(gallery, qdir, ref):
        t0 = time.monotonic()
        assert cli(args, root / "ref.log") == 0, (root / "ref.log").read_text()[-3000:]
        durations[name] = time.monotonic() - t0
    rng = random.Random(0)
    log = root / "killed.log"
    resumed_at = []
    for name, args, resume in steps(gallery, qdir, killed):
        kills = attempts = 0
        scale, fresh = 1.0, True
        while kills < KILLS and attempts < 3 * KILLS:
            # the first run of a command starts fresh; later ones resume (train-siamese) or rerun,
            # and have less left to do: the kill comes early enough to land
            code = cli(args + ([] if fresh else resume), log,
                       kill_after=rng.uniform(0.1, 0.7) * scale * durations[name])
            attempts += 1
            fresh = False
            assert code in (0, -9), log.read_text()[-3000:]
            if code == -9:
                kills += 1
            else:  # finished before the kill (the reference ran on a busier machine): kill sooner
                scale /= 2
                if name == "train-siamese":  # a finished training resumes to nothing: train it again
                    shutil.rmtree(killed)
                    kills, fresh = 0, True
                    resumed_at.clear()  # the epoch checks below are about the chain that is kept
                    log.rename(log.with_name(f"discarded{attempts}.log"))
            if killed.is_dir():
                check_readable(killed)
            ck = killed / "checkpoint.pt"
            if name == "train-siamese" and ck.is_file():
                resumed_at.append(torch.load(ck, weights_only=False)["epoch"])
        assert kills >= 2, f"{name} was killed {kills} time(s) in {attempts} attempts"
        assert cli(args + resume, log) == 0, log.read_text()[-3000:]
        check_readable(killed)
    text = log.read_text()
    # finished epochs were not redone: each resume started at the epoch its checkpoint held
    assert all(f"at epoch {e}" in text for e in resumed_at if e), (resumed_at, text[-3000:])
    m_ref = json.loads((ref / "metrics.json").read_text())
    m_killed = json.loads((killed / "metrics.json").read_text())
    assert without_timing(m_killed["train_siamese"]["history"]) == without_timing(m_ref["train_siamese"]["history"])
    with h5py.File(ref / "gallery.h5") as a, h5py.File(killed / "gallery.h5") as b:
        np.testing.assert_array_equal(a["embeddings"][()], b["embeddings"][()])
    for f in ("heldout.json", "calibration.json"):
        assert without_timing(json.loads((ref / f).read_text())) == without_timing(json.loads((killed / f).read_text())), f
    assert (root / "ref_pred.csv").read_bytes() == (root / "killed_pred.csv").read_bytes()
    assert (root / "ref_pred.csv").read_text().count("\n") > 1


def test_resume_refuses_a_changed_catalog(data, tmp_path):
    root, gallery, qdir = data
    run = tmp_path / "run"
    base = ["train-siamese", "--catalog", gallery, "--out", run, "--epochs", 1, "--input-size", "64x96",
            "--batch-size", 16, "--heldout-fraction", 0.5, "--seed", 3]
    assert cli(base, tmp_path / "log") == 0
    lines = gallery.read_text().splitlines()
    changed = tmp_path / "changed.csv"
    # one training photo relabelled: same individuals held out, other training data
    held = set(json.loads((run / "heldout.json").read_text())["individuals"])
    k = next(i for i, line in enumerate(lines[1:], 1) if line.split(",")[1] not in held)
    parts = lines[k].split(",")
    parts[1] = next(line.split(",")[1] for line in lines[1:] if line.split(",")[1] not in held | {parts[1]})
    lines[k] = ",".join(parts)
    changed.write_text("\n".join(lines) + "\n")
    out = tmp_path / "log2"
    assert cli([*base[:2], changed, *base[3:], "--resume"], out) == 2
    assert "the training photos differ from those of the checkpoint" in out.read_text()


def test_ctrl_c_exits_130_and_a_plain_rerun_does_not_start_the_training_over(data, tmp_path):
    """Ctrl-C (SIGINT) mid-training: exit 130, without the native abort a teardown under busy worker
    threads can give (134), and the message says how to continue; run again without --resume, the
    command refuses rather than train from scratch over the finished epochs."""
    root, gallery, qdir = data
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("")  # a log the shell opened in --out first: no reason to refuse it
    args = ["train-siamese", "--catalog", gallery, "--out", run, "--epochs", 40, "--input-size", "64x96",
            "--batch-size", 16, "--heldout-fraction", 0.5, "--seed", 3, "--max-minutes", 0, "--precision", "fp32"]
    with open(tmp_path / "log", "wb") as out:
        # SIGINT as a terminal gives it: a shell without job control starts background jobs (a CI runner's
        # `cmd &`) with SIGINT ignored, which their children inherit and Python then keeps
        proc = subprocess.Popen([sys.executable, "cli.py", *map(str, args), "-q"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if os.name == "posix"
                                else None)
        deadline = time.monotonic() + 300
        while not (run / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]  # 40 epochs: still training
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    text = (tmp_path / "log").read_text()
    assert code == 130, text[-3000:]
    assert "interrupted: every file written before now is complete" in text and "--resume continues" in text
    assert (run / "checkpoint.pt").is_file() and not (run / "siamese.pt").exists()
    again = tmp_path / "again"
    assert cli(args, again) == 2
    assert "holds an interrupted training (checkpoint.pt): --resume continues it" in again.read_text()
    # --overwrite starts over: the interrupted training's checkpoint is not kept to be resumed later
    args[args.index("--epochs") + 1] = 0
    assert cli(args + ["--overwrite"], again) == 0, again.read_text()[-3000:]
    assert not (run / "checkpoint.pt").exists() and (run / "siamese.pt").is_file()
