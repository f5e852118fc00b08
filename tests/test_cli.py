"""The CLI end to end on the synthetic sample, including the exit-code-2 cases."""
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from keypoints.whitening import Whitening
from core.metrics import NEW_INDIVIDUAL
from tests.conftest import ROOT

runner = CliRunner()
SIZE = "64x96"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    r = invoke("train-siamese", "--catalog", sample, "--out", out, "--epochs", 0, "--input-size", SIZE, "-q")
    assert r.exit_code == 0, r.output
    assert "gallery 32 photos of 8 individuals" in r.output
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder_contents(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["train"]["seed"] == 0 and "torch" in cfg["versions"]
    assert cfg["train"]["model"]["input_size"] == [64, 96]
    for name in ("siamese.pt", "gallery.h5", "heldout.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "cache" / "embeddings").glob("shard-*.h5"))


def test_match_exact_copies_finds_their_individual(sample, run_dir, tmp_path):
    rows = read_csv(sample)[::4]
    test_dir = tmp_path / "new"
    test_dir.mkdir()
    for k, row in enumerate(rows):
        shutil.copyfile(sample.parent / row["image"], test_dir / f"photo{k}.jpg")
    (test_dir / "broken.jpg").write_bytes(b"\x00" * 10)
    (test_dir / "notes.txt").write_text("not a photo")  # ignored: not an image suffix
    out = tmp_path / "pred.csv"
    r = invoke("match", test_dir, "--run", run_dir, "--out", out, "--report", tmp_path / "review.html", "-q")
    assert r.exit_code == 0, r.output
    assert "1 unreadable photo(s) skipped" in r.output
    # the review page lists it with the reason, beside the matched photos
    page = (tmp_path / "review.html").read_text()
    assert f"{len(rows)} queries · 1 unreadable" in page and "broken.jpg: cannot decode image" in page
    # gallery photos are named as the catalog lists them (with their folder), not by file name alone
    shown = set(re.findall(r'"name":"([^"]*)"', page))
    assert any("/" in row["image"] and row["image"] in shown for row in read_csv(sample)), sorted(shown)[:5]
    assert not any(name.startswith("/") for name in shown)
    pred = {p["image"]: p["predictions"].split() for p in read_csv(out)}
    # the unreadable photo keeps its row (empty predictions), in the folder's sorted order
    assert [p["image"] for p in read_csv(out)] == sorted(["broken.jpg"] + [f"photo{k}.jpg" for k in range(len(rows))])
    assert pred.pop("broken.jpg") == []
    assert set(pred) == {f"photo{k}.jpg" for k in range(len(rows))}
    for k, row in enumerate(rows):
        assert pred[f"photo{k}.jpg"][0] == row["individual_id"]
        assert len(pred[f"photo{k}.jpg"]) == 5
    evidence = json.loads(out.with_suffix(".json").read_text())
    first = evidence["queries"][0]["candidates"][0]
    assert first["embedding_score"] == pytest.approx(1.0, abs=1e-3)
    assert evidence["skipped"][0]["image"] == "broken.jpg"


def test_the_evidence_names_each_query_photo_by_its_absolute_path(sample, run_dir, tmp_path, monkeypatch):
    """A test folder given relative to the working folder: the JSON's `path` still finds the photo from
    elsewhere (as the review page's and its decisions' paths do)."""
    (tmp_path / "q").mkdir()
    shutil.copyfile(sample.parent / read_csv(sample)[0]["image"], tmp_path / "q" / "0.jpg")
    monkeypatch.chdir(tmp_path)
    r = invoke("match", "q", "--run", run_dir, "--out", "p.csv", "-q")
    assert r.exit_code == 0, r.output
    path = json.loads((tmp_path / "p.json").read_text())["queries"][0]["path"]
    assert os.path.isabs(path) and os.path.samefile(path, tmp_path / "q" / "0.jpg")


def test_match_with_viewpoints(sample, run_dir, tmp_path):
    rows = [r for r in read_csv(sample) if r["viewpoint"] == "right"][:3]
    test_dir = tmp_path / "q"
    test_dir.mkdir()
    with open(tmp_path / "queries.csv", "w") as f:
        f.write("image,viewpoint\n")
        for k, row in enumerate(rows):
            shutil.copyfile(sample.parent / row["image"], test_dir / f"{k}.jpg")
            f.write(f"{k}.jpg,right\n")
    out = tmp_path / "p.csv"
    r = invoke("match", test_dir, "--run", run_dir, "--out", out, "--queries", tmp_path / "queries.csv", "-q")
    assert r.exit_code == 0, r.output
    ev = json.loads(out.with_suffix(".json").read_text())
    gallery_rows = {str((sample.parent / g["image"]).resolve()): g["viewpoint"] for g in read_csv(sample)}
    for q in ev["queries"]:
        assert len(q["candidates"]) == 5  # 8 individuals have right flanks: five are listed
        assert all(gallery_rows[c["gallery_image"]] == "right" for c in q["candidates"])
    # a viewpoint no gallery photo has: such photos meet no gallery photo, and the user is told so
    shutil.copyfile(test_dir / "0.jpg", test_dir / "3.jpg")
    with open(tmp_path / "queries.csv", "a") as f:
        f.write("3.jpg,front\n")
    r = invoke("match", test_dir, "--run", run_dir, "--out", out, "--queries", tmp_path / "queries.csv", "-q")
    assert r.exit_code == 0, r.output
    assert ("1 query photo(s) of a viewpoint no gallery photo has (front: 1; the gallery's: left, right) meet only "
            f"the 0 gallery photo(s) without a viewpoint, so they are answered {NEW_INDIVIDUAL}") in r.output
    pred = {p["image"]: p for p in read_csv(out)}
    assert pred["3.jpg"]["predictions"].split() == [NEW_INDIVIDUAL] and pred["0.jpg"]["predictions"] != NEW_INDIVIDUAL


def test_evaluate_open_set(sample, run_dir, tmp_path):
    # labelled queries: two gallery individuals (their own photos are excluded from matching) and one
    # individual the gallery has never seen
    rows = read_csv(sample)
    extra = tmp_path / "extra"
    from engine.synthetic import make_dataset

    new_cat = make_dataset(extra, n_individuals=1, photos_per_individual=2, seed=99, size=(96, 128))
    lab = tmp_path / "labelled.csv"
    with open(lab, "w") as f:
        f.write("image,individual_id\n")
        for row in rows[:2]:
            f.write(f"{(sample.parent / row['image']).resolve()},{row['individual_id']}\n")
        for row in read_csv(new_cat):
            f.write(f"{(extra / row['image']).resolve()},brand_new\n")
    r = invoke("evaluate", "--catalog", lab, "--run", run_dir, "-q")
    assert r.exit_code == 0, r.output
    assert "MAP@5" in r.output and "evaluated 4 labelled photos (2 of individuals absent" in r.output
    metrics = json.loads((run_dir / "metrics.json").read_text())["evaluate"]
    assert metrics["queries"] == 4 and metrics["new_share_truth"] == pytest.approx(0.5)
    # the settings beside the figures, so that two evaluations with other options can be told apart
    assert metrics["settings"]["shortlist"] == 50 and metrics["settings"]["rerank"] == 0
    r = invoke("evaluate", "--catalog", lab, "--run", run_dir, "--shortlist", 7, "--rerank", 3, "-q")
    assert r.exit_code == 0, r.output
    settings = json.loads((run_dir / "metrics.json").read_text())["evaluate"]["settings"]
    assert settings["shortlist"] == 7 and settings["rerank"] == 3 and settings["matchers"] == []
    # where the right animal of each of the two known photos ended up: counted once each, and said
    assert sum(metrics["right_animal"].values()) == 2
    assert "the right animal of the 2 known queries (closed set): first" in r.output
    # an unreadable photo has no answer: counted as a wrong one, and said so
    (tmp_path / "broken.jpg").write_bytes(b"\x00" * 10)
    with open(lab, "a") as f:
        f.write(f"{tmp_path / 'broken.jpg'},{rows[0]['individual_id']}\n")
    r = invoke("evaluate", "--catalog", lab, "--run", run_dir, "-q")
    assert r.exit_code == 0 and "1 unreadable photo(s) counted as wrong answers" in r.output, r.output
    assert "broken.jpg: cannot decode image" in r.output and "(line 6 of its CSV)" in r.output, r.output
    again = json.loads((run_dir / "metrics.json").read_text())["evaluate"]
    assert again["queries"] == 5 and again["map5"] == pytest.approx(metrics["map5"] * 4 / 5)


@pytest.mark.parametrize("case", ["bad_column", "empty_id", "missing_image", "empty_test_dir",
                                  "old_run", "no_run", "bad_size", "non_utf8_config", "bad_calibration",
                                  "truncated_gallery", "out_is_a_folder", "evidence_json_is_a_folder",
                                  "out_under_a_file", "test_dir_is_a_file", "negative_threads", "tau_above_1",
                                  "bad_crop", "bad_views", "repeated_view", "calibration_not_json",
                                  "negative_max_minutes", "out_among_photos", "interrupted_training",
                                  "empty_test_dir_out_in_new_folders", "missing_weights", "out_in_run",
                                  "out_is_a_photo", "out_is_the_queries_csv", "report_named_like_a_photo",
                                  "queries_is_a_folder", "calibration_of_a_newer_engine", "report_over_the_photos",
                                  "report_over_other_files", "no_photo_readable", "run_is_its_config", "out_is_a_dash"])
def test_bad_input_exits_2_with_one_sentence(case, sample, run_dir, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    if case == "bad_column":
        (tmp_path / "c.csv").write_text("photo,individual_id\na.jpg,x\n")
        args = ["train-siamese", "--catalog", tmp_path / "c.csv", "--out", tmp_path / "r"]
        expect = "columns found: photo, individual_id"
    elif case == "empty_id":
        (tmp_path / "c.csv").write_text("image,individual_id\na.jpg,\n")
        args = ["train-siamese", "--catalog", tmp_path / "c.csv", "--out", tmp_path / "r"]
        expect = "c.csv:2: empty individual_id"
    elif case == "missing_image":
        (tmp_path / "c.csv").write_text("image,individual_id\na.jpg,x\nb.jpg,y\n")
        args = ["evaluate", "--catalog", tmp_path / "c.csv", "--run", run_dir]
        expect = "c.csv:3: image b.jpg not found"
    elif case == "empty_test_dir":
        (tmp_path / "empty").mkdir()
        args = ["match", tmp_path / "empty", "--run", run_dir, "--out", tmp_path / "p.csv"]
        expect = "has no images"
    elif case == "old_run":
        old = tmp_path / "old"
        shutil.copytree(run_dir, old)
        cfg = json.loads((old / "config.json").read_text())
        cfg["format_version"] = 0
        (old / "config.json").write_text(json.dumps(cfg))
        args = ["match", tmp_path, "--run", old, "--out", tmp_path / "p.csv"]
        expect = "format version 0"
    elif case == "empty_test_dir_out_in_new_folders":  # refused after --out was checked: no folder left
        (tmp_path / "empty").mkdir()
        args = ["match", tmp_path / "empty", "--run", run_dir, "--out", tmp_path / "new" / "sub" / "p.csv"]
        expect = "has no images"
    elif case == "missing_weights":
        args = ["train-siamese", "--catalog", sample, "--out", tmp_path / "r", "--weights", tmp_path / "no.pth"]
        expect = f"backbone weights {tmp_path / 'no.pth'} not found (--weights)"
    elif case == "negative_max_minutes":
        args = ["train-siamese", "--catalog", sample, "--out", tmp_path / "r", "--max-minutes", -1]
        expect = "Invalid value for '--max-minutes'"
    elif case == "out_among_photos":  # the run's files are not written among the user's own
        args = ["train-siamese", "--catalog", sample, "--out", tmp_path]
        (tmp_path / "train.log").write_text("")  # (a log the shell opened there is no reason to refuse)
        expect = f"--out {tmp_path} holds photos (a.jpg) and is not a run folder: give a new or empty folder"
    elif case == "interrupted_training":
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "checkpoint.pt").write_bytes(b"x")
        args = ["train-siamese", "--catalog", sample, "--out", tmp_path / "r"]
        expect = "holds an interrupted training (checkpoint.pt): --resume continues it from its last finished epoch"
    elif case in ("non_utf8_config", "bad_calibration", "truncated_gallery", "calibration_not_json",
                  "calibration_of_a_newer_engine"):
        broken = tmp_path / "broken"
        shutil.copytree(run_dir, broken)
        if case == "non_utf8_config":
            (broken / "config.json").write_bytes(b'{"format_version": "\xff\xfe"}')
            expect = "config.json: not UTF-8 text"
        elif case == "truncated_gallery":
            data = (broken / "gallery.h5").read_bytes()
            (broken / "gallery.h5").write_bytes(data[:1000])
            expect = "gallery.h5 cannot be read (OSError"
        elif case == "calibration_not_json":
            (broken / "calibration.json").write_text('{"broken')
            expect = "calibration.json: not valid JSON ("
        elif case == "calibration_of_a_newer_engine":
            (broken / "calibration.json").write_text('{"kind": "calibration", "version": 2}')
            expect = "calibration.json is of format version 2, this engine reads version 1"
        else:
            (broken / "calibration.json").write_text('{"fusion": {"kind": "score_fusion"}}')
            expect = "calibration.json is malformed"
        args = ["match", tmp_path, "--run", broken, "--out", tmp_path / "p.csv"]
    elif case == "out_in_run":  # the predictions JSON beside it would have replaced the run's config.json
        args = ["match", tmp_path, "--run", run_dir, "--out", run_dir / "config.csv"]
        expect = f"--out {run_dir / 'config.csv'} is inside the run folder {run_dir}"
    elif case == "out_is_a_photo":
        args = ["match", tmp_path, "--run", run_dir, "--out", tmp_path / "a.jpg"]
        expect = "the predictions are a CSV (e.g. a.csv)"
    elif case == "out_is_the_queries_csv":
        (tmp_path / "q.csv").write_text("image\na.jpg\n")
        args = ["match", tmp_path, "--queries", tmp_path / "q.csv", "--run", run_dir, "--out", tmp_path / "q.csv"]
        expect = f"--out {tmp_path / 'q.csv'} is the --queries CSV match reads"
    elif case == "report_over_the_photos":  # its thumbnail folder is the folder of photos matched
        (tmp_path / "s_files").mkdir()
        (tmp_path / "s_files" / "0123456789abcdef0123.webp").write_bytes(b"x")  # (named like a thumbnail)
        args = ["match", tmp_path / "s_files", "--run", run_dir, "--out", tmp_path / "p.csv", "--report",
                tmp_path / "s.html"]
        expect = "which holds what match reads"
    elif case == "queries_is_a_folder":  # named as the user gave it
        args = ["match", tmp_path, "--queries", tmp_path, "--run", run_dir, "--out", tmp_path / "p.csv"]
        expect = f"--queries {tmp_path} is a folder: give the CSV file that lists its photos"
    elif case == "report_named_like_a_photo":  # (its thumbnails, in b_files/, would be new photos next time)
        args = ["match", tmp_path, "--run", run_dir, "--out", tmp_path / "p.csv", "--report", tmp_path / "b.jpg"]
        expect = "the review page is an HTML file (e.g. b.html)"
    elif case == "report_over_other_files":  # a folder of the user's named like the page's thumbnails
        (tmp_path / "photos").mkdir()
        shutil.copyfile(tmp_path / "a.jpg", tmp_path / "photos" / "a.jpg")
        (tmp_path / "r_files").mkdir()
        (tmp_path / "r_files" / "notes.txt").write_text("mine")
        args = ["match", tmp_path / "photos", "--run", run_dir, "--out", tmp_path / "p.csv", "--report",
                tmp_path / "r.html"]
        expect = f"keeps its thumbnails in {tmp_path / 'r_files'}, which holds other files"
    elif case == "no_photo_readable":  # nothing to answer: an error, not a CSV of empty rows
        (tmp_path / "photos").mkdir()
        shutil.copyfile(tmp_path / "a.jpg", tmp_path / "photos" / "a.jpg")
        args = ["match", tmp_path / "photos", "--run", run_dir, "--out", tmp_path / "p.csv"]
        expect = f"none of the 1 query photos could be read (first: {tmp_path / 'photos' / 'a.jpg'}"
    elif case == "out_is_a_dash":  # (a file named "-" would be written)
        args = ["match", tmp_path, "--run", run_dir, "--out", "-"]
        expect = "--out -: match writes a CSV file and its evidence JSON beside it, not to the terminal"
    elif case == "out_is_a_folder":
        (tmp_path / "p.csv").mkdir()
        args = ["match", tmp_path, "--run", run_dir, "--out", tmp_path / "p.csv"]
        expect = "p.csv is a folder"
    elif case == "evidence_json_is_a_folder":  # refused before matching, named as the user sees it
        (tmp_path / "p.json").mkdir()
        args = ["match", tmp_path, "--run", run_dir, "--out", tmp_path / "p.csv"]
        expect = f"the evidence JSON goes beside it, at {tmp_path / 'p.json'}, which is a folder"
    elif case == "out_under_a_file":
        args = ["match", tmp_path, "--run", run_dir, "--out", tmp_path / "a.jpg" / "p.csv"]
        expect = f"cannot be written: {tmp_path / 'a.jpg'} is a file, not a folder"
    elif case == "test_dir_is_a_file":
        args = ["match", tmp_path / "a.jpg", "--run", run_dir, "--out", tmp_path / "p.csv"]
        expect = "a.jpg is a file: give the folder"
    elif case == "negative_threads":
        args = ["match", tmp_path, "--run", run_dir, "--out", tmp_path / "p.csv", "--threads", -3]
        expect = "Invalid value for '--threads'"
    elif case == "tau_above_1":
        args = ["match", tmp_path, "--run", run_dir, "--out", tmp_path / "p.csv", "--tau", 1.5]
        expect = "Invalid value for '--tau'"
    elif case == "no_run":
        args = ["match", tmp_path, "--run", tmp_path / "nowhere", "--out", tmp_path / "p.csv"]
        expect = "does not exist"
    elif case == "run_is_its_config":
        args = ["match", tmp_path, "--run", run_dir / "config.json", "--out", tmp_path / "p.csv"]
        expect = f"run folder {run_dir / 'config.json'} is a file: give the folder that holds it ({run_dir})"
    elif case == "bad_crop":
        args = ["train-siamese", "--catalog", sample, "--out", tmp_path / "r", "--crop", "tight"]
        expect = "crop 'tight': choose one of focus, none"
    elif case == "bad_views":
        args = ["train-siamese", "--catalog", sample, "--out", tmp_path / "r", "--views", "box,center"]
        expect = "--views 'box,center': 'center' is no view (it is spelled centre)"
    elif case == "repeated_view":
        args = ["train-siamese", "--catalog", sample, "--out", tmp_path / "r", "--views", "box, photo,Box"]
        expect = "--views 'box, photo,Box': box given twice"
    else:
        args = ["train-siamese", "--catalog", sample, "--out", tmp_path / "r", "--input-size", "big"]
        expect = "is not HEIGHTxWIDTH"
    kept = {p: p.read_bytes() for p in [run_dir / "config.json", tmp_path / "a.jpg", tmp_path / "q.csv",
                                        tmp_path / "r_files" / "notes.txt",
                                        tmp_path / "s_files" / "0123456789abcdef0123.webp"] if p.is_file()}
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert expect in r.output and "Traceback" not in r.output
    assert {p: p.read_bytes() for p in kept} == kept and not (run_dir / "config.csv").exists()
    assert not (tmp_path / "p.csv").is_file() and not (tmp_path / "p.json").is_file()
    assert not list(tmp_path.glob("*.tmp*"))
    if case in ("bad_calibration", "calibration_not_json"):  # the advice works: calibrate replaces the file
        assert "`cli.py calibrate` writes it anew" in r.output
        r = runner.invoke(app, ["calibrate", "--run", str(broken), "--folds", "2", "-q"])
        assert r.exit_code == 0 and "set aside (it is replaced)" in r.output, r.output
        assert json.loads((broken / "calibration.json").read_text())["tau"]["fused"] is not None
    if case == "interrupted_training":
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["checkpoint.pt"]  # nothing started over
    else:
        assert not (tmp_path / "r").exists()  # train-siamese refused before making its run folder
    assert not (tmp_path / "new").exists()  # (match refused after checking --out, which made no folder)


def test_help_explains_every_command():
    r = invoke("--help")
    assert r.exit_code == 0
    expected = {"train-siamese": "--epochs", "train-verifier": "--keypoints", "calibrate": "--folds",
                "match": "--report", "evaluate": "--catalog", "enroll": "--catalog", "demo": "--out"}
    for cmd, option in expected.items():
        assert cmd in r.output
        sub = invoke(cmd, "--help")
        assert sub.exit_code == 0 and option in sub.output


def test_help_fits_a_terminal_of_80_columns():
    """Every option's name is shown whole and nothing runs past the edge (a table of options used to cut
    names and words at 80 columns)."""
    import typer.main
    env = {**os.environ, "COLUMNS": "80"}
    commands = typer.main.get_command(app).commands
    for cmd in ("", "match", "train-siamese", "calibrate"):
        proc = subprocess.run([sys.executable, "cli.py"] + ([cmd] if cmd else []) + ["--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80 and "\u2026" not in proc.stdout
        for param in commands[cmd].params if cmd else []:
            for name in param.opts + param.secondary_opts:
                if name.startswith("--"):
                    assert any(name in line.split() or f"{name}," in line.split() for line in lines), (cmd, name)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The README's first command, as a user runs it."""
    proc = subprocess.run([sys.executable, "cli.py", "demo", "--out", str(tmp_path / "demo"), "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MAP@5" in proc.stdout and "demo finished" in proc.stdout
    rows = read_csv(tmp_path / "demo" / "predictions.csv")
    truth = read_csv(tmp_path / "demo" / "split" / "truth.csv")
    assert len(rows) == len(truth) and any(t["individual_id"] == NEW_INDIVIDUAL for t in truth)
    map5 = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("MAP@5")))
    assert map5 > 0.3  # chance on 20 known + new_individual is far below
    # the printed figures are saved as evaluate saves them: the engine's, and each stage's
    saved = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())["evaluate"]
    fused = next(line.split()[-2] for line in proc.stdout.splitlines() if line.startswith("MAP@5"))
    assert f"{saved['map5']:.3f}" == fused == f"{saved['ablation']['fused']['map5']:.3f}"
    assert saved["settings"]["verify_top"] == 50 and saved["queries"] == len(truth)
    # the command it prints to score the queries again works as printed
    again = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("score them again"))
    rerun = subprocess.run([sys.executable, *shlex.split(again)[1:], "-q"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert [line for line in rerun.stdout.splitlines() if line.startswith("MAP@5")] == \
        [line for line in proc.stdout.splitlines() if line.startswith("MAP@5")]  # the same figures
    # the sample calibrates on a few held-out individuals: calibrate warns, with advice the demo can follow
    assert "tau rests on" in proc.stderr and "expected in the demo" in proc.stderr, proc.stderr[-2000:]
    # the demo's catalog is large enough to learn the SIFT descriptors' whitening from (5479 correct
    # matches measured); config.json names it, and a whitening file that does not fit is refused
    run = tmp_path / "demo" / "run"
    white = json.loads((run / "config.json").read_text())["whitening"]
    assert white["correspondences"] >= 2000
    assert Whitening.load(run / white["file"]).fingerprint == white["fingerprint"]
    data = (run / white["file"]).read_bytes()
    (run / white["file"]).write_bytes(data[:len(data) // 2])  # (a truncated zip: BadZipFile)
    r = invoke("match", tmp_path / "demo" / "split" / "queries", "--run", run, "--out", tmp_path / "p.csv", "-q")
    assert r.exit_code == 2 and "whitening.npz cannot be read" in r.output and "train-verifier" in r.output
    (run / white["file"]).write_bytes(data)
    # and the model of inliers (191 true and 304 false training pairs with inliers measured): config.json
    # names it, the validator reads its features, and a file that is not the one recorded is refused
    from keypoints.inlier_weights import WEIGHT_FEATURES, InlierWeights
    from keypoints.verify import FEATURE_NAMES

    entry = json.loads((run / "config.json").read_text())["inlier_weights"]["sift"]
    info = json.loads((run / "metrics.json").read_text())["train_verifier"]["inlier_weights"]["sift"]
    assert info["fitted"] and min(info["pairs_with_inliers_true"], info["pairs_with_inliers_false"]) >= 100
    assert InlierWeights.load(run / entry["file"]).fingerprint == entry["fingerprint"] == info["fingerprint"]
    verifier = json.loads((run / "verifier.json").read_text())
    assert verifier["feature_names"] == list(FEATURE_NAMES) + list(WEIGHT_FEATURES)
    # calibrate weighed the keypoint votes by that model (and recorded it); the shortlist's votes are the
    # weighted ones, which differ from the plain; a calibration from before weighted votes keeps them plain
    from core.cache import record_key
    from core.catalog import catalog_from_folder
    from engine.pipeline import Engine, MatchConfig
    from keypoints.inlier_weights import relative_xy

    cal = json.loads((run / "calibration.json").read_text())
    assert cal["match"]["vote_weights"] is True
    engine = Engine.load(run)
    records = catalog_from_folder(tmp_path / "demo" / "split" / "queries").records[:6]
    emb = engine.embed(records, MatchConfig(), progress=False)
    index, model = engine.vote_index(), engine.vote_model()
    kps = engine.stage("keypoints").store.get(records, progress=False)
    everything = np.ones(len(engine.gallery), bool)
    differ = 0
    for rec, qp in zip(records, engine.shortlist(records, emb, MatchConfig(votes=4))):
        kp = kps[record_key(rec)]
        weighted = index.votes(kp.desc, everything, relative_xy(kp), model)
        np.testing.assert_allclose(qp.votes, weighted[qp.gallery_idx], rtol=1e-6)
        differ += not np.allclose(weighted, index.votes(kp.desc, everything))
    assert differ
    plain = engine.shortlist(records, emb, MatchConfig(votes=4, vote_weights=False))
    np.testing.assert_allclose(plain[0].votes, index.votes(kps[record_key(records[0])].desc, everything)[
        plain[0].gallery_idx], rtol=1e-6)
    old = {**cal, "match": {k: v for k, v in cal["match"].items() if k != "vote_weights"}}
    (run / "calibration.json").write_text(json.dumps(old))
    assert not Engine.load(run).vote_weights(MatchConfig()) and Engine.load(run).vote_weights(
        MatchConfig(vote_weights=True))
    (run / "calibration.json").write_text(json.dumps(cal))
    entry["fingerprint"] = "0" * 16
    cfg = json.loads((run / "config.json").read_text())
    cfg["inlier_weights"]["sift"] = entry
    (run / "config.json").write_text(json.dumps(cfg))
    r = invoke("match", tmp_path / "demo" / "split" / "queries", "--run", run, "--out", tmp_path / "p.csv", "-q")
    assert r.exit_code == 2 and "inlier_weights.json is not the model of inliers config.json records" in r.output


@pytest.mark.slow
def test_demo_on_a_small_catalog_of_your_own(tmp_path):
    """`demo --catalog`: a catalog too small for the demo's split stops before any work, with the
    size it needs, and leaves nothing in --out; one just large enough runs, holding out more than the usual 20% of the individuals
    so that calibrate has its three folds."""
    from engine.demo import smallest_catalog
    from engine.synthetic import make_dataset

    n = smallest_catalog()
    assert n == 12  # the size `demo --help` and the README give
    small = make_dataset(tmp_path / "small", n_individuals=n - 1, photos_per_individual=3, size=(96, 128))
    r = invoke("demo", "--catalog", small, "--out", tmp_path / "out_small", "-q")
    assert r.exit_code == 2 and f"A catalog of {n} or more individuals with 3 or more photos each is enough" in r.output, r.output
    assert not (tmp_path / "out_small").exists()  # nothing written: no run, no split of the catalog
    enough = make_dataset(tmp_path / "enough", n_individuals=n, photos_per_individual=3, size=(96, 128))
    r = invoke("demo", "--catalog", enough, "--out", tmp_path / "out", "-q")
    assert r.exit_code == 0 and "demo finished" in r.output, r.output
    heldout = json.loads((tmp_path / "out" / "run" / "heldout.json").read_text())
    # 5 held out: 2 validated on after each epoch, and (averaged weights: chosen by none) all 5 calibrate
    assert len(heldout["individuals"]) == 5 and len(heldout["validation"]) == 2
    assert heldout["calibration"] == heldout["individuals"]
    # run again into the same --out, moved: the demo replaces its own earlier run
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "out", moved)
    (moved / "predictions.csv").write_text("stale")
    r = invoke("demo", "--catalog", enough, "--out", moved, "-q")
    assert r.exit_code == 0 and "demo finished" in r.output, r.output
    assert (moved / "predictions.csv").read_text() != "stale"
    # the earlier verifier goes, and the demo fits it again itself: no advice to run train-verifier
    assert "fitted for the previous network (the demo fits it again)" in r.output, r.output
    assert "run train-verifier" not in r.output


def test_demo_replaces_only_its_own_run(sample, run_dir, tmp_path):
    """A run trained into --out/run by something else is refused before any work (the demo's own
    earlier run is replaced: test_demo_on_a_small_catalog_of_your_own runs the demo again into a moved
    copy of its --out)."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out / "run")
    r = invoke("demo", "--out", out, "-q")
    assert r.exit_code == 2 and "holds a trained run that the demo did not make" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == ["run"]  # no sample, no split written


def test_resume_refuses_other_split_settings_and_says_when_it_starts_over(sample, tmp_path):
    run = tmp_path / "run"
    base = ["train-siamese", "--catalog", sample, "--out", run, "--epochs", 1, "--input-size", SIZE,
            "--batch-size", 8, "--heldout-fraction", 0.25, "-q"]
    assert invoke(*base).exit_code == 0 and (run / "checkpoint.pt").is_file()
    heldout = (run / "heldout.json").read_bytes()
    r = invoke(*base[:-1], "--resume", "--seed", 1, "-q")
    assert r.exit_code == 2 and "--resume with --seed 1" in r.output
    assert (run / "heldout.json").read_bytes() == heldout  # nothing rewritten
    r = invoke(*base[:-1], "--resume", "--heldout-fraction", 0.5, "-q")
    assert r.exit_code == 2 and "--heldout-fraction 0.5" in r.output
    # another recipe would make the run half one training and half another; a longer budget is fine
    r = invoke(*base[:-1], "--resume", "--freeze-blocks", 0, "-q")
    assert r.exit_code == 2 and "--freeze-blocks 0, but" in r.output and "trained with 3" in r.output
    r = invoke(*[a if a != SIZE else "96x128" for a in base[:-1]], "--resume", "-q")
    assert r.exit_code == 2 and "--input-size 96x128" in r.output
    r = invoke(*base[:-1], "--resume", "--crop", "none", "-q")
    assert r.exit_code == 2 and "--crop none, but" in r.output and "trained with focus" in r.output
    assert (run / "heldout.json").read_bytes() == heldout
    # a resume builds the gallery again from --catalog: photos enrolled into the previous one are set aside
    (run / "enrolled.csv").write_text("image,individual_id,viewpoint\n/photos/x.jpg,new_one,\n")
    r = invoke(*[a if a != 1 else 2 for a in base], "--resume")
    assert r.exit_code == 0 and "the previous gallery had 1 enrolled photo(s)" in r.output, r.output
    assert not (run / "enrolled.csv").exists() and len(list(run.glob("enrolled-before-retraining-*.csv"))) == 1
    # a config.json that does not record the seed: refused in one sentence, not a KeyError
    config = json.loads((run / "config.json").read_text())
    del config["train"]["seed"]
    (run / "config.json").write_text(json.dumps(config))
    r = invoke(*base[:-1], "--resume", "-q")
    assert r.exit_code == 2 and "--resume with --seed 0, but" in r.output and "trained with None" in r.output
    # (from here a catalog of 8 photos: on a CPU without native bf16 each bf16 embedding is slow)
    from engine.synthetic import make_dataset

    few = make_dataset(tmp_path / "few", n_individuals=4, photos_per_individual=2, seed=2, size=(96, 128))
    fresh = tmp_path / "fresh"
    r = runner.invoke(app, [str(a) for a in ["train-siamese", "--catalog", few, "--out", fresh, "--epochs", 1,
                                             "--input-size", SIZE, "--batch-size", 8, "--resume", "-v"]])
    assert r.exit_code == 0 and "no checkpoint" in r.output
    # a resume keeps the precision its run recorded (here the other one than this CPU's, as if given by
    # --precision): the gallery is embedded as the checkpoint was trained, whatever a new first-use
    # measurement would say
    config = json.loads((fresh / "config.json").read_text())
    other = "fp32" if config["precision"]["choice"]["name"] == "bf16" else "bf16"
    config["precision"] = {**config["precision"], "requested": other, "choice": {"name": other, "channels_last": True}}
    (fresh / "config.json").write_text(json.dumps(config))
    r = invoke("train-siamese", "--catalog", few, "--out", fresh, "--epochs", 1, "--input-size", SIZE,
               "--batch-size", 8, "--resume", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((fresh / "config.json").read_text())["precision"]["choice"]["name"] == other
    # ... and the gallery was embedded in it: the network in that precision gives gallery.h5's embeddings,
    # in the other precision not (bf16 and fp32 differ by far more than the tolerance)
    from engine.pipeline import Engine
    from siamese.embed import embed_records
    from siamese.model import load_model
    from siamese.precision import Precision

    gallery = Engine.load(fresh).gallery
    for name, same in ((other, True), ("fp32" if other == "bf16" else "bf16", False)):
        model = load_model(fresh / "siamese.pt")
        model.set_precision(Precision(name, channels_last=True))
        emb = embed_records(model, gallery.records(), None, batch_size=8, workers=1, progress=False).embeddings
        assert np.allclose(emb, gallery.embeddings, atol=1e-5) == same, name
    # killed before its first checkpoint: the settings it recorded still hold
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(fresh / "config.json", half / "config.json")
    r = invoke("train-siamese", "--catalog", few, "--out", half, "--epochs", 1, "--input-size", SIZE,
               "--batch-size", 8, "--resume", "--seed", 5, "-q")
    assert r.exit_code == 2 and "--resume with --seed 5" in r.output
    assert "starts from scratch" not in r.output  # refused: no warning that training starts
    assert sorted(p.name for p in half.iterdir()) == ["config.json"]  # nothing rewritten
    # an existing file is not a run folder
    r = invoke("train-siamese", "--catalog", sample, "--out", sample, "--epochs", 0, "-q")
    assert r.exit_code == 2 and "is a file" in r.output


def test_non_ascii_and_spaces_in_paths(tmp_path):
    """Folders and photo names with accents and spaces, through train-siamese, match and the page."""
    from engine.synthetic import make_dataset

    folder = tmp_path / "Zèbres du parc"
    catalog = make_dataset(folder, n_individuals=4, photos_per_individual=2, seed=4, size=(96, 128))
    rows = read_csv(catalog)
    for r in rows:
        new = f"é {r['image'].replace('/', ' ')}"
        (folder / r["image"]).rename(folder / new)
        r["image"] = new
    with open(catalog, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run = tmp_path / "run ü"
    r = invoke("train-siamese", "--catalog", catalog, "--out", run, "--epochs", 0, "--input-size", SIZE, "-q")
    assert r.exit_code == 0, r.output
    queries = tmp_path / "nouvelles photos"
    queries.mkdir()
    shutil.copyfile(folder / rows[0]["image"], queries / "photo ü 1.jpg")
    pred = tmp_path / "prédictions.csv"
    r = invoke("match", queries, "--run", run, "--out", pred, "--report", tmp_path / "revue é.html", "-q")
    assert r.exit_code == 0, r.output
    out = read_csv(pred)
    assert out[0]["image"] == "photo ü 1.jpg" and out[0]["predictions"].split()[0] == rows[0]["individual_id"]
    assert (tmp_path / "revue é_files").is_dir()


def test_evidence_positions_are_in_the_whole_photos_when_the_catalog_crops(tmp_path):
    # the stages see the bbox crops; predictions.json places the inliers in the whole photos
    from core.catalog import Record
    from engine.pipeline import Candidate, QueryResult, write_predictions

    query = Record(image="q.jpg", path=tmp_path / "q.jpg", individual_id=None, bbox=(100, 40, 50, 60))
    xy = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], np.float32)
    cands = [Candidate("A", 0.9, 0, "g0.jpg", {"keypoints": 0.9}, {"inliers": 2, "inliers_xy": xy}, (-5, 7, 80, 90)),
             Candidate("B", 0.5, 1, "g1.jpg", {"keypoints": 0.5}, {"inliers": 2, "inliers_xy": xy}, None)]
    write_predictions([QueryResult(query, "q.jpg", ["A", "B"], cands)], tmp_path / "p.csv")
    doc = json.loads((tmp_path / "p.json").read_text())
    q = doc["queries"][0]
    assert q["bbox"] == [100, 40, 50, 60] and "x, y in the query photo" in doc["inliers_xy"]
    a, b = q["candidates"]
    # the query crop starts at (100, 40); A's at (0, 7) (its bbox starts left of the photo); B is whole
    assert a["gallery_bbox"] == [-5, 7, 80, 90] and a["inliers_xy"] == [[101, 42, 3, 11], [110, 60, 30, 47]]
    assert "gallery_bbox" not in b and b["inliers_xy"] == [[101, 42, 3, 4], [110, 60, 30, 40]]
    assert a["inliers"] == 2


def test_too_few_calibration_individuals_are_announced_with_the_fraction_that_gives_them(sample, tmp_path):
    # 8 individuals: the default 20% holds out 2 (the averaged weights are chosen by neither, so both
    # calibrate): calibrate needs 3
    run = tmp_path / "run"
    base = ["train-siamese", "--catalog", sample, "--out", run, "--epochs", 1, "--input-size", SIZE,
            "--batch-size", 8, "-q"]
    r = invoke(*base)
    assert r.exit_code == 0, r.output
    assert "leaves 2 individual(s) to calibrate on; calibrate needs 3" in r.output
    assert "--heldout-fraction 0.38 gives them" in r.output  # 3 of 8 held out
    r = invoke("calibrate", "--run", run, "-q")
    assert r.exit_code == 2 and "Calibrate with --folds 2, or train again with --heldout-fraction 0.38 " \
                                "--overwrite" in r.output, r.output
    assert "chose the training epoch" not in r.output
    # a network kept as its best epoch by validation (TrainConfig.average_from=None): half of the held-out
    # individuals chose it, so the advice holds out twice as many (5 of 8: 2 for the epoch, 3 to calibrate)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "train": {**config["train"], "average_from": None}}))
    r = invoke("calibrate", "--run", run, "-q")
    assert r.exit_code == 2 and "(half of them chose the training epoch)" in r.output, r.output
    assert "Calibrate with --folds 2, or train again with --heldout-fraction 0.63 --overwrite" in r.output
    r = invoke(*base[:-1], "--heldout-fraction", 0.38, "--overwrite", "-q")
    assert r.exit_code == 0 and "calibrate on" not in r.output
    assert len(json.loads((run / "heldout.json").read_text())["calibration"]) == 3


def test_heldout_individuals_calibrate_unless_they_chose_the_epoch():
    from engine.calibrate import heldout_fraction_needed
    from engine.train_siamese import TrainConfig, heldout_roles
    held = [f"id{i}" for i in range(7)]
    default = TrainConfig()
    # averaged weights (the default): validated on every other one, chosen by none, all calibrate
    assert heldout_roles(held, default.epochs, default.average_from) == (["id1", "id3", "id5"], held)
    # the best epoch by validation: its validation individuals never calibrate
    assert heldout_roles(held, default.epochs, None) == (["id1", "id3", "id5"], ["id0", "id2", "id4", "id6"])
    # untrained: nothing validated, all calibrate
    assert heldout_roles(held, 0, None) == ([], held)
    # 3 calibration individuals among 8: 3 held out, or 5 where 2 of them choose the epoch
    assert (heldout_fraction_needed(8, False), heldout_fraction_needed(8, True)) == (0.38, 0.63)


def test_progress_bars_written_to_a_log_file_update_every_30_seconds(tmp_path):
    # stderr not a terminal: tqdm reads TQDM_MININTERVAL when it is imported, so cli.py sets it first
    code = ("import cli, tqdm.auto, os; print(os.environ['TQDM_MININTERVAL'], "
            "tqdm.auto.tqdm(total=1, file=open(os.devnull, 'w')).mininterval)")
    with open(tmp_path / "log", "w") as err:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                             env={k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"})
    assert out.returncode == 0 and out.stdout.split() == ["30", "30.0"], (out.stdout, (tmp_path / "log").read_text())


def test_train_verifier_keeps_the_inlier_count_where_the_whole_geometry_scores_worse(run_dir, tmp_path,
                                                                                    monkeypatch):
    # the folds' figures as a small catalog gives them (12 individuals: the whole geometry 0.585, the
    # inlier count's logistic model 0.638): the validator then looks at the inlier count alone
    import engine.train_verifier
    from keypoints.validator import INLIERS, Validator

    def folds(whole, inliers):
        return lambda *a, uses=None, **k: {"auc_validator": inliers if uses else whole, "auc_inliers": 0.715}

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    monkeypatch.setattr(engine.train_verifier, "heldout_auc", folds(0.585, 0.638))
    r = invoke("train-verifier", "--run", run, "--no-whitening", "-q")
    assert r.exit_code == 0, r.output
    assert "less well than their inlier count (AUC 0.585 against 0.638)" in r.output
    assert "held-out AUC 0.638 (on the inlier count alone; the whole geometry 0.585, raw inlier count 0.715)" in r.output
    validator = Validator.load(run / "verifier.json")
    assert validator.uses == list(INLIERS)
    # a logistic model of the count: other features do not move it, more inliers never lower it
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 30, (50, len(validator.feature_names))).astype(np.float32)
    col = validator.feature_names.index("n_inliers")
    scores = [validator.predict(np.where(np.arange(X.shape[1]) == col, n, X)) for n in (0, 5, 10, 40)]
    assert all(np.ptp(sc) < 1e-6 for sc in scores) and scores[0][0] <= scores[1][0] <= scores[2][0] <= scores[3][0]
    assert scores[3][0] > scores[0][0] + 0.1
    monkeypatch.setattr(engine.train_verifier, "heldout_auc", folds(0.70, 0.71))  # within 0.02: the whole geometry
    r = invoke("train-verifier", "--run", run, "--no-whitening", "-q")
    assert "less well" not in r.output and Validator.load(run / "verifier.json").uses is None
