"""The whole engine through the CLI on a synthetic sample: train (briefly), train-verifier,
calibrate, match with the review page, evaluate's ablation, and enroll."""
import csv
import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from core.catalog import Record
from engine.enroll import write_added
from engine.synthetic import make_dataset, split_open_set
from tests.test_report import page_data

pytestmark = pytest.mark.slow
runner = CliRunner()


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trained once per module: a run with the Siamese network, and a copy with the verifier too.
    Tests get their own copy of one of them (`chain`, `siamese_only`), so they pass in any order."""
    root = tmp_path_factory.mktemp("chain")
    catalog = make_dataset(root / "sample", n_individuals=16, photos_per_individual=4, seed=5, size=(96, 128))
    gallery, qdir, truth = split_open_set(catalog, root / "split", n_unseen=3, seed=5)
    run = root / "run"
    out = invoke("train-siamese", "--catalog", gallery, "--out", run, "--epochs", 1, "--input-size", "64x96",
                 "--batch-size", 16, "--heldout-fraction", 0.4, "-q")
    assert "1 epoch(s) trained" in out and "embedding whitened for search" in out
    verified = root / "run_verified"
    shutil.copytree(run, verified)
    invoke("train-verifier", "--run", verified, "-q")
    return root, run, verified, qdir, truth


@pytest.fixture
def siamese_only(trained, tmp_path):
    root, run, _, qdir, truth = trained
    shutil.copytree(run, tmp_path / "run")
    return root, tmp_path / "run", qdir, truth


@pytest.fixture
def chain(trained, tmp_path):
    root, _, verified, qdir, truth = trained
    shutil.copytree(verified, tmp_path / "run")
    return root, tmp_path / "run", qdir, truth


def test_verifier_calibrate_match_evaluate(siamese_only):
    root, run, qdir, truth = siamese_only
    out = invoke("train-verifier", "--run", run, "-q")
    auc = float(re.search(r"held-out AUC ([0-9.]+)", out).group(1))
    assert auc > 0.6  # measured 0.72 on this sample (seed 5); 0.5 is chance
    assert json.loads((run / "verifier.json").read_text())
    # this small sample gives too few correct matches to learn a whitening from: said, and skipped
    assert "descriptor whitening skipped" in out and "sift descriptors as extracted" in out
    assert json.loads((run / "config.json").read_text())["whitening"] is None
    # nor enough false pairs with inliers (15 measured) to learn which inliers tell individuals apart:
    # said, and the validator reads the geometry alone
    from keypoints.verify import FEATURE_NAMES

    assert "sift inlier weights: none (" in out and "false training pairs with inliers" in out
    assert json.loads((run / "config.json").read_text())["inlier_weights"] == {}
    assert not (run / "inlier_weights.json").exists()
    assert json.loads((run / "verifier.json").read_text())["feature_names"] == list(FEATURE_NAMES)
    out = invoke("calibrate", "--run", run, "--folds", 3, "-q")
    cal = json.loads((run / "calibration.json").read_text())
    assert set(cal["tau"]) == {"votes", "embedding", "siamese", "keypoints", "fused"}
    assert len(cal["per_fold"]) == 3 and "fused" in out
    assert len(cal["tau_folds"]["values"]) == 3 and "over folds" in out
    held = json.loads((run / "heldout.json").read_text())
    # a trained run is validated on some; its averaged weights were chosen by none: all of them calibrate
    assert held["validation"] and set(held["validation"]) < set(held["calibration"]) == set(held["individuals"])
    # every photo of a calibration individual, in each fold: as a new animal all of them, as a known
    # one all but one (so that the gallery keeps one of its photos)
    from collections import Counter
    from core.gallery import Gallery
    photos = Counter(i for i in Gallery.load(run / "gallery.h5").ids if i in set(held["calibration"]))
    assert cal["queries"] == sum(c + 2 * (c - 1) for c in photos.values())
    assert cal["new_queries"] == sum(photos.values())
    # tau rests on few animals: calibrate says so and takes the lowest tau of the folds, per score
    assert cal["individuals"] == len(held["calibration"]) < 30
    assert cal["tau_rule"] == "fold_min" and "lowest fold tau" in out
    assert f"all folds together {cal['tau_all_folds']['fused']:.3f}" in out  # every tau the lowest is taken of
    for name, tau in cal["tau"].items():
        assert tau == min([cal["tau_all_folds"][name]] + [r[name]["tau"] for r in cal["per_fold"]])
    pred = root / "pred.csv"
    out = invoke("match", qdir, "--run", run, "--out", pred, "--report", root / "report.html", "-q")
    rows = list(csv.DictReader(open(pred)))
    with open(truth) as f:
        n_queries = sum(1 for _ in f) - 1
    assert len(rows) == n_queries
    ev = json.loads(pred.with_suffix(".json").read_text())
    cand = ev["queries"][0]["candidates"][0]
    assert {"votes_score", "embedding_score", "siamese_score", "keypoints_score", "score"} <= set(cand)
    data = page_data((root / "report.html").read_text())
    assert len(data["queries"]) == n_queries
    thumb = data["queries"][0]["candidates"][0]["thumb"]["src"]
    img = cv2.imread(str(root / thumb), cv2.IMREAD_COLOR)  # report_files/<hash>.webp beside the page
    assert img is not None and img.shape[2] == 3
    assert any(q["candidates"][0]["n_inliers"] for q in data["queries"])  # keypoint evidence is there
    out = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "-q")
    header = out.splitlines()[0].split()
    assert header == ["metric", "votes", "embedding", "siamese", "keypoints", "fused", "fused:top2mean"]
    fused_map = float(out.splitlines()[1].split()[5])
    assert fused_map > 0.4  # measured 0.67 on this sample (seed 5)


def test_calibrate_with_one_query_per_individual(chain):
    """--queries-per-individual 1: each calibration individual is one query per fold (new in one
    fold, known in the others), as before every photo was used."""
    root, run, qdir, truth = chain
    out = invoke("calibrate", "--run", run, "--queries-per-individual", 1, "-q")
    cal = json.loads((run / "calibration.json").read_text())
    held = json.loads((run / "heldout.json").read_text())
    assert cal["queries"] == 3 * len(held["calibration"]) and cal["new_queries"] == len(held["calibration"])
    assert cal["config"]["queries_per_individual"] == 1
    assert f"calibrated on {cal['queries']} queries of {len(held['calibration'])} held-out individuals" in out


def test_tau_rule_follows_the_number_of_individuals(chain, monkeypatch, caplog):
    """Enough calibration individuals: tau is MAP@5's best over all folds, even where a fold chose a
    lower one; --new-rate: the rate's tau, never lowered."""
    from engine import calibrate as command
    from engine.config import INDIVIDUAL_WEIGHT
    from engine.pipeline import MatchConfig
    root, run, qdir, truth = chain
    invoke("calibrate", "--run", run, "-q")
    few = json.loads((run / "calibration.json").read_text())
    assert few["tau_rule"] == "fold_min"
    monkeypatch.setattr(command, "MIN_NEW_INDIVIDUALS", 2)
    out = invoke("calibrate", "--run", run, "-q")
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["tau_rule"] == "map5" and "best MAP@5" in out and "lowest fold tau" not in out
    assert cal["tau_folds"] == few["tau_folds"]  # same folds, same fits: only the rule differs
    assert cal["tau"] == cal["tau_all_folds"] == few["tau_all_folds"]
    assert all(cal["tau"][n] >= few["tau"][n] for n in cal["tau"])
    monkeypatch.setattr(command, "MIN_NEW_INDIVIDUALS", 30)
    invoke("calibrate", "--run", run, "--new-rate", 0.5, "--per-individual", 1, "-q")
    rate = json.loads((run / "calibration.json").read_text())
    assert rate["tau_rule"] == "rate" and rate["config"]["target_new_rate"] == 0.5
    assert rate["tau"] == rate["tau_all_folds"]  # the rate's tau, not lowered
    assert rate["match"] == {"shortlist": 50, "verify_top": 50, "per_individual": 1, "votes": MatchConfig.votes,
                             "individual_weight": INDIVIDUAL_WEIGHT, "votes_rule": "share_v",
                             "vote_weights": False,  # (the sample gives too few pairs for a model of inliers)
                             "complete": MatchConfig.complete}
    # match warns when its settings differ from the calibrated ones; a calibration from before
    # --per-individual had no cap
    from engine.pipeline import Engine
    engine = Engine.load(run)
    logging.getLogger().handlers = [caplog.handler]  # the CLI's logging setup replaced pytest's
    with caplog.at_level("WARNING", logger="engine.pipeline"):
        engine.tau(MatchConfig(per_individual=1))
        assert not caplog.text
        engine.tau(MatchConfig())
        engine.tau(MatchConfig())  # asked again by the same command: not repeated
        assert "--per-individual 1" in caplog.text and "--per-individual 0" in caplog.text
        assert caplog.text.count("calibrated with") == 1
        assert "--shortlist" not in caplog.text  # only what differs
        caplog.clear()
        # without votes: said once, not again as the weighting of votes that no longer exist
        engine.calibration["match"]["vote_weights"] = True
        engine.tau(MatchConfig(per_individual=1, votes=0))
        assert f"--votes {MatchConfig.votes}" in caplog.text and "--votes 0" in caplog.text
        assert "vote-weights" not in caplog.text and "--per-individual" not in caplog.text
        caplog.clear()
        # calibrated without votes, matched with them: said as the votes alone too
        engine.calibration["match"].update(votes=0)
        engine.tau(MatchConfig(per_individual=1))
        assert "--votes 0" in caplog.text and "vote-weights" not in caplog.text
        engine.calibration["match"].update(votes=MatchConfig.votes, vote_weights=False)
        caplog.clear()
        del engine.calibration["match"]["per_individual"]
        engine.tau(MatchConfig())
        assert not caplog.text


def test_a_calibration_fitted_for_other_files_is_refused(chain, trained, tmp_path):
    """calibration.json holds for the network and verifier it was fitted with: kept after verifier.json was
    removed, or copied into a run without a verifier, it is refused, naming what differs (it ranked on a
    stage that was not there: on the demo every known animal was answered new_individual), and calibrate
    fits it again."""
    root, run, qdir, truth = chain
    invoke("calibrate", "--run", run, "-q")
    fitted = json.loads((run / "calibration.json").read_text())["fitted_for"]
    assert {"siamese.pt", "embedding_whitening.npz", "verifier.json"} <= set(fitted)  # (the sample is too small
    # for a whitening of the descriptors or a model of inliers)
    assert "matched" in invoke("match", qdir, "--run", run, "--out", tmp_path / "p.csv", "-q")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "verifier.json").unlink()
    other = tmp_path / "plain"  # the same network, without a verifier
    shutil.copytree(trained[1], other)
    shutil.copyfile(run / "calibration.json", other / "calibration.json")
    changed = tmp_path / "changed"  # a verifier replaced by hand (the same model, written another way)
    shutil.copytree(run, changed)
    (changed / "verifier.json").write_text(json.dumps(json.loads((run / "verifier.json").read_text()), indent=1))
    for target, said in [(broken, "verifier.json missing"), (other, "verifier.json missing"),
                         (changed, "verifier.json changed")]:
        r = runner.invoke(app, ["match", str(qdir), "--run", str(target), "--out", str(tmp_path / "q.csv")])
        assert r.exit_code == 2 and f"was fitted for other files than this run's ({said})" in r.output, r.output
        assert f"`cli.py calibrate --run {target}` fits it again" in r.output and not (tmp_path / "q.csv").exists()
    r = runner.invoke(app, ["evaluate", "--catalog", str(truth), "--images", str(qdir), "--run", str(broken)])
    assert r.exit_code == 2 and "(verifier.json missing)" in r.output, r.output
    out = invoke("calibrate", "--run", broken, "-q")  # the advice works: set aside and fitted again
    assert "set aside (it is replaced)" in out
    assert "matched" in invoke("match", qdir, "--run", broken, "--out", tmp_path / "q.csv", "-q")
    # without heldout.json calibrate cannot tell its individuals: said, not "train with more held out"
    (broken / "heldout.json").unlink()
    r = runner.invoke(app, ["calibrate", "--run", str(broken)])
    assert r.exit_code == 2 and f"{broken / 'heldout.json'} is missing" in r.output, r.output


def test_train_verifier_pairs_do_not_depend_on_a_stale_calibration(chain):
    """train-verifier on a calibrated run (verified again) mines the same pairs as on a fresh one: the
    pair head's order, not the fusion of the calibration it is about to replace."""
    from core.stage import ALL
    from engine.config import VerifierTrainConfig
    from engine.pipeline import Engine
    from engine.stages import STAGES
    from engine.train_verifier import build_training_pairs

    _, run, _, _ = chain
    invoke("calibrate", "--run", run, "--folds", 3, "-q")
    stages = [s.name for s in STAGES if s.scope == ALL]
    calibrated = Engine.load(run, stages=stages)
    assert calibrated.scorers  # the fusion is there to be used
    with_calibration = build_training_pairs(calibrated, VerifierTrainConfig())
    (run / "calibration.json").unlink()
    fresh = build_training_pairs(Engine.load(run, stages=stages), VerifierTrainConfig())
    assert with_calibration == fresh and any(t[2] == 0 for t in fresh) and any(t[2] == 1 for t in fresh)


def test_retraining_drops_the_stale_verifier_and_calibration(chain, tmp_path):
    root, run, qdir, truth = chain
    rerun = tmp_path / "rerun"
    shutil.copytree(run, rerun)
    assert (rerun / "verifier.json").exists()
    (rerun / "calibration.json").write_text("{}")
    # every matcher's validator and model of inliers, as train-verifier --matchers sift,xfeat leaves them
    others = ["inlier_weights.json", "verifier-xfeat.json", "inlier_weights-xfeat.json"]
    for name in others:
        (rerun / name).write_text("{}")
    weights = (rerun / "siamese.pt").read_bytes()
    args = ["train-siamese", "--catalog", root / "split" / "gallery.csv", "--out", rerun, "--epochs", 0,
            "--input-size", "64x96", "--heldout-fraction", 0.4, "-q"]
    # a trained run is not replaced without being asked to
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2 and "already holds a trained run" in r.output and "--overwrite" in r.output
    assert (rerun / "siamese.pt").read_bytes() == weights and (rerun / "calibration.json").exists()
    # photos enrolled into the replaced gallery: their rows are set aside (the new gallery is --catalog's)
    enrolled = "image,individual_id,viewpoint\n/photos/x.jpg,new_one,\n"
    (rerun / "enrolled.csv").write_text(enrolled)
    assert (rerun / "embedding_whitening.npz").exists()
    r = runner.invoke(app, [str(a) for a in args + ["--overwrite", "--no-whiten-embedding"]])
    assert r.exit_code == 0 and "the previous gallery had 1 enrolled photo(s)" in r.output, r.output
    assert "whitened" not in r.output and not (rerun / "embedding_whitening.npz").exists()  # (the old one removed)
    assert not (rerun / "verifier.json").exists() and not (rerun / "calibration.json").exists()
    assert not any((rerun / name).exists() for name in others)
    assert not (rerun / "enrolled.csv").exists()
    [aside] = rerun.glob("enrolled-before-retraining-*.csv")
    assert aside.read_text() == enrolled and f"enroll --catalog {aside}" in r.output
    # twice within a second: the first file set aside is kept
    (rerun / "enrolled.csv").write_text(enrolled.replace("x.jpg", "y.jpg"))
    from engine.train_siamese import set_aside_enrolled
    from core.runfolder import RunFolder
    set_aside_enrolled(RunFolder(rerun))
    assert sorted(p.read_text() for p in rerun.glob("enrolled-before-retraining-*.csv")) == \
        sorted([enrolled, enrolled.replace("x.jpg", "y.jpg")])
    out = invoke("match", qdir, "--run", rerun, "--out", tmp_path / "p.csv", "-q")
    assert out.startswith("matched")


def test_match_refuses_clashing_outputs_and_matchers_without_a_verifier(chain, tmp_path):
    root, run, qdir, truth = chain
    base = ["match", qdir, "--run", run, "--out", tmp_path / "p.csv", "-q"]
    for clash in ("p.csv", "p.json"):
        r = runner.invoke(app, [str(a) for a in base + ["--report", tmp_path / clash]])
        assert r.exit_code == 2 and "its own file name" in r.output, r.output
    assert not (tmp_path / "p.csv").exists()
    r = runner.invoke(app, [str(a) for a in base + ["--matchers", " XFeat"]])  # (names in any case)
    assert r.exit_code == 2 and "no verifier for it (verifier-xfeat.json)" in r.output
    r = runner.invoke(app, [str(a) for a in base + ["--matchers", ""]])
    assert r.exit_code == 2 and "at least one name" in r.output
    # a review page written into the folder of new photos is not matched as new photos next time
    page_dir = tmp_path / "new"
    shutil.copytree(qdir, page_dir)
    n = len(list(page_dir.iterdir()))
    args = ["match", page_dir, "--run", run, "--out", page_dir / "p.csv", "--report", page_dir / "review.html", "-q"]
    out = invoke(*args)
    assert f"matched {n} photos" in out and any((page_dir / "review_files").iterdir())
    assert f"matched {n} photos" in invoke(*args)
    # a --queries CSV that lists some of the folder's photos, without viewpoints: both said
    photos = sorted(p.relative_to(qdir).as_posix() for p in qdir.rglob("*.jpg"))
    (tmp_path / "q.csv").write_text("image,view\n" + "".join(f"{p},left\n" for p in photos[:2]))
    some = invoke("match", qdir, "--run", run, "--out", tmp_path / "some.csv", "--queries", tmp_path / "q.csv", "-q")
    assert "matched 2 photos" in some and "gives no viewpoint" in some
    assert f"{len(photos) - 2} photo(s) of {qdir} are not in {tmp_path / 'q.csv'} and are not matched" in some
    # this run has a verifier but no calibration: said, with what it means for the answers
    assert "is not calibrated: photos are ranked by the siamese stage alone (keypoints unused)" in out


def test_enroll_makes_a_new_individual_matchable(chain, tmp_path):
    root, run, qdir, truth = chain
    newcat = make_dataset(tmp_path / "new", n_individuals=1, photos_per_individual=3, seed=77, size=(96, 128))
    rows = list(csv.DictReader(open(newcat)))
    enroll_csv = tmp_path / "new" / "enroll.csv"
    (tmp_path / "new" / "broken.jpg").write_bytes(b"not a photo")
    with open(enroll_csv, "w") as f:
        f.write("image,individual_id\n")
        for r in rows[:2]:
            f.write(f"{r['image']},zebra_77\n")
        f.write("broken.jpg,zebra_77\n")
    out = invoke("enroll", "--catalog", enroll_csv, "--run", run, "-q")
    assert "enrolled 2 photos (1 new individual, 1 unreadable photo(s) skipped" in out, out
    # the same catalog again: nothing new, which is no error (the unreadable photo is said again)
    assert "nothing new to enroll: 2 confirmed photos of" in (out := invoke("enroll", "--catalog", enroll_csv,
                                                                            "--run", run, "-q"))
    assert "the other 1 could not be read (first: " in out and "broken.jpg: cannot decode image" in out, out
    qd = tmp_path / "q"
    qd.mkdir()
    shutil.copyfile(tmp_path / "new" / rows[0]["image"], qd / "again.jpg")
    invoke("match", qd, "--run", run, "--out", tmp_path / "p.csv", "-q")
    ev = json.loads((tmp_path / "p.json").read_text())
    assert ev["queries"][0]["candidates"][0]["individual_id"] == "zebra_77"


def test_review_page_decisions_enroll(chain, tmp_path, browser):
    """The review loop end to end: match --report, decisions by keyboard in headless Chromium, the
    exported decisions.csv read by enroll --decisions, the new individual then matched."""
    root, run, qdir, truth = chain
    page_path = tmp_path / "review.html"
    invoke("match", qdir, "--run", run, "--out", tmp_path / "p.csv", "--report", page_path, "-q")
    data = page_data(page_path.read_text())
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    try:
        page.goto(page_path.as_uri())
        page.keyboard.press("1")                        # query 1: its first candidate
        page.keyboard.press("ArrowDown")
        page.keyboard.press("n")                        # query 2: a new individual
        page.keyboard.type("newcomer_1")
        page.keyboard.press("Enter")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("u")                        # query 3: unsure
        with page.expect_download() as dl:
            page.click("#export")
        decisions = tmp_path / "decisions.csv"
        dl.value.save_as(decisions)
    finally:
        ctx.close()
    rows = list(csv.DictReader(open(decisions, newline="")))
    q = data["queries"]
    assert [(r["image"], r["decision"], r["individual_id"]) for r in rows] == [
        (q[0]["path"], "match", q[0]["candidates"][0]["id"]), (q[1]["path"], "new", "newcomer_1"),
        (q[2]["path"], "unsure", "")]
    out = invoke("enroll", "--decisions", decisions, "--run", run, "-q")
    assert "enrolled 2 photos (1 new individual, 1 unsure left out)" in out
    added = list(csv.DictReader(open(run / "enrolled.csv")))
    assert [(r["image"], r["individual_id"]) for r in added] == [
        (q[0]["path"], q[0]["candidates"][0]["id"]), (q[1]["path"], "newcomer_1")]
    # the same decisions again (an interrupted session, or unsure whether it ran): nothing to do
    out = invoke("enroll", "--decisions", decisions, "--run", run, "-q")
    assert "nothing to enroll: all 2 confirmed photos" in out and "already in the gallery" in out
    # the same photo under another individual is a problem, named with its line
    clash = tmp_path / "clash.csv"
    clash.write_text(f"image,individual_id\n{q[1]['path']},someone_else\n")
    r = runner.invoke(app, ["enroll", "--catalog", str(clash), "--run", str(run), "-q"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and f"{clash}:2: image" in text and "already in the gallery as individual newcomer_1" in text
    qd = tmp_path / "again"
    qd.mkdir()
    shutil.copyfile(q[1]["path"], qd / "copy.jpg")  # the new individual's photo, seen again
    invoke("match", qd, "--run", run, "--out", tmp_path / "again.csv", "-q")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["queries"][0]["candidates"][0]["individual_id"] == "newcomer_1"


def test_enroll_decisions_keeps_the_photos_viewpoint_and_box(chain, tmp_path):
    """A photo matched with a viewpoint and a box (match --queries) keeps both through the review
    page's decisions.csv into the gallery and enrolled.csv, as enroll --catalog would add it."""
    root, run, qdir, truth = chain
    first, second = sorted(qdir.rglob("*.jpg"))[:2]
    h, w = cv2.imread(str(first)).shape[:2]
    box = f"2,3,{w - 4},{h - 6}"
    queries = tmp_path / "queries.csv"
    queries.write_text(f'image,viewpoint,bbox\n{first.relative_to(qdir)},left,"{box}"\n{second.relative_to(qdir)},,\n')
    page_path = tmp_path / "review.html"
    invoke("match", qdir, "--run", run, "--out", tmp_path / "p.csv", "--queries", queries, "--report", page_path, "-q")
    pages = {q["path"]: q for q in page_data(page_path.read_text())["queries"]}
    q, other = pages[str(first.resolve())], pages[str(second.resolve())]
    assert (q["viewpoint"], q["bbox"], other["viewpoint"], other["bbox"]) == ("left", box, "", "")
    decisions = tmp_path / "decisions.csv"  # as the page exports it
    with open(decisions, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "decision", "individual_id", "note", "viewpoint", "bbox"])
        out.writerow([q["path"], "new", "newcomer_2", "", q["viewpoint"], q["bbox"]])
        out.writerow([other["path"], "new", "newcomer_3", "", other["viewpoint"], other["bbox"]])
    invoke("enroll", "--decisions", decisions, "--run", run, "-q")
    added = list(csv.DictReader(open(run / "enrolled.csv")))
    assert [(r["image"], r["individual_id"], r["viewpoint"], r["bbox"]) for r in added] == [
        (q["path"], "newcomer_2", "left", box), (other["path"], "newcomer_3", "", "")]
    from core.gallery import Gallery
    g = Gallery.load(run / "gallery.h5")
    i, j = g.ids.index("newcomer_2"), g.ids.index("newcomer_3")
    assert (g.viewpoints[i], g.bbox(i), g.viewpoints[j], g.bbox(j)) == ("left", (2, 3, w - 4, h - 6), "", None)
    # an enrolled.csv begun before the bbox column (and without a final newline) gets the column (its rows an
    # empty cell: the file is written anew)
    (run / "enrolled.csv").write_text("image,individual_id,viewpoint\n/photos/x.jpg,x1,")
    write_added(run, [Record(image="y.jpg", path=Path("/photos/y.jpg"), individual_id="y1", viewpoint="right",
                             bbox=(1, 2, 3, 4))])
    assert (run / "enrolled.csv").read_text().splitlines() == [
        "image,individual_id,viewpoint,bbox", "/photos/x.jpg,x1,,", '/photos/y.jpg,y1,right,"1,2,3,4"']


def test_enroll_lists_its_photos_before_the_gallery_takes_them(chain, tmp_path, monkeypatch):
    """enroll writes enrolled.csv (the photos to put in a new training's catalog) before gallery.h5: one
    stopped between the two lost nothing, and run again adds the photos to the gallery and lists them once.
    A list that cannot be written is refused before any work."""
    from core.gallery import Gallery
    root, run, qdir, truth = chain
    photos = sorted(qdir.rglob("*.jpg"))[:2]
    catalog = tmp_path / "c.csv"
    catalog.write_text("image,individual_id\n" + "".join(f"{p},late_{k}\n" for k, p in enumerate(photos)))
    gallery = (run / "gallery.h5").read_bytes()
    (run / "enrolled.csv").mkdir()
    r = runner.invoke(app, ["enroll", "--catalog", str(catalog), "--run", str(run), "-q"])
    assert r.exit_code == 2 and f"{run / 'enrolled.csv'} is a folder" in " ".join(r.output.split()), r.output
    assert (run / "gallery.h5").read_bytes() == gallery
    (run / "enrolled.csv").rmdir()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Gallery, "save", full_disk)
        r = runner.invoke(app, ["enroll", "--catalog", str(catalog), "--run", str(run), "-q"])
    assert r.exit_code != 0 and (run / "gallery.h5").read_bytes() == gallery
    listed = [(row["image"], row["individual_id"]) for row in csv.DictReader(open(run / "enrolled.csv"))]
    assert listed == [(str(p.resolve()), f"late_{k}") for k, p in enumerate(photos)]
    # run again, with an ID corrected meanwhile: the photo is listed once, under the ID the gallery takes
    catalog.write_text(catalog.read_text().replace("late_0", "late_fixed"))
    out = invoke("enroll", "--catalog", catalog, "--run", run, "-q")
    assert "enrolled 2 photos (2 new individuals" in out, out
    assert {"late_fixed", "late_1"} <= set(Gallery.load(run / "gallery.h5").ids)
    assert [(row["image"], row["individual_id"]) for row in csv.DictReader(open(run / "enrolled.csv"))] == [
        (str(photos[0].resolve()), "late_fixed"), (str(photos[1].resolve()), "late_1")]


def test_ids_spelled_another_way_are_said(chain, tmp_path):
    """A catalog whose IDs are the gallery's in other letter case scores every photo as a new individual:
    evaluate says so, and enroll says which new IDs look like known ones (each stays an animal of its own)."""
    root, run, qdir, truth = chain
    rows = list(csv.DictReader(open(truth)))
    upper = tmp_path / "upper.csv"
    upper.write_text("image,individual_id\n" + "".join(
        f"{r['image']},{r['individual_id'] if r['individual_id'] == 'new_individual' else r['individual_id'].upper()}\n"
        for r in rows))
    out = " ".join(invoke("evaluate", "--catalog", upper, "--images", qdir, "--run", run, "-q").split())
    known = {r["individual_id"] for r in rows} - {"new_individual"}
    assert f"none of the {len(known)} individuals of {upper} is in the gallery" in out, out
    assert "differ from another only in letter case or accent encoding" in out
    photo = sorted(qdir.rglob("*.jpg"))[0]
    gallery_id = sorted(known)[0]
    catalog = tmp_path / "c.csv"
    catalog.write_text(f"image,individual_id\n{photo},{gallery_id.upper()}\n")
    out = " ".join(invoke("enroll", "--catalog", catalog, "--run", run).split())
    assert f"1 individual ID(s) in {catalog} and the gallery differ from another only in letter case" in out, out
    assert f"'{gallery_id.upper()}' / '{gallery_id}'" in out and "enrolled 1 photo (1 new individual" in out


def test_enroll_knows_a_copy_of_a_gallery_photo(chain, tmp_path):
    """The same photo under another file name: refused under another individual (as the photo itself is),
    left out under its own (it is there already)."""
    from core.gallery import Gallery
    root, run, qdir, truth = chain
    g = Gallery.load(run / "gallery.h5")
    for k in (0, 1):
        shutil.copyfile(g.paths[k], tmp_path / f"IMG_{k}.jpg")
    other = next(i for i in g.ids if i != g.ids[0])
    catalog = tmp_path / "c.csv"
    catalog.write_text(f"image,individual_id\nIMG_0.jpg,{other}\nIMG_1.jpg,{g.ids[1]}\n")
    before = (run / "gallery.h5").read_bytes()
    r = runner.invoke(app, ["enroll", "--catalog", str(catalog), "--run", str(run), "-q"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "1 problem(s)" in text and "nothing enrolled" in text, r.output
    assert f"{catalog}:2: image IMG_0.jpg is the same photo as {g.paths[0]} in the gallery, of individual " \
           f"{g.ids[0]}, not {other}" in text
    assert (run / "gallery.h5").read_bytes() == before
    catalog.write_text(f"image,individual_id\nIMG_0.jpg,{g.ids[0]}\nIMG_1.jpg,{g.ids[1]}\n")
    out = invoke("enroll", "--catalog", catalog, "--run", run, "-q")
    assert "nothing to enroll: the 2 confirmed photos of" in out and "(copies of its photos too)" in out, out
    assert len(Gallery.load(run / "gallery.h5")) == len(g)


def test_a_match_stopped_while_writing_its_page_leaves_no_page_of_earlier_answers(chain, tmp_path, monkeypatch):
    import engine.review
    root, run, qdir, truth = chain
    out, page = tmp_path / "p.csv", tmp_path / "p.html"
    invoke("match", qdir, "--run", run, "--out", out, "--report", page, "-q")
    assert page.is_file()
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    shutil.copyfile(sorted(qdir.rglob("*.jpg"))[0], fewer / "one.jpg")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.review, "write_review", stopped)
    r = runner.invoke(app, ["match", str(fewer), "--run", str(run), "--out", str(out), "--report", str(page), "-q"])
    assert r.exit_code == 130, r.output
    assert len(list(csv.DictReader(open(out)))) == 1 and not page.exists()  # (not the page of the first answers)


def test_an_older_gallery_whose_ids_hold_spaces_is_warned_about_and_its_ids_can_be_decided(chain, tmp_path):
    """Catalogs with such IDs are refused now; a run trained before keeps them: said at load, and a review
    decision naming one of them is still accepted."""
    from core.gallery import Gallery
    root, run, qdir, truth = chain
    g = Gallery.load(run / "gallery.h5")
    old = g.ids[0]
    g.ids = ["Big Mama" if i == old else i for i in g.ids]
    g.save(run / "gallery.h5")
    out = " ".join(invoke("match", qdir, "--run", run, "--out", tmp_path / "p.csv").split())
    assert "1 individual ID(s) of the gallery hold a space ('Big Mama')" in out and "(e.g. Big_Mama)" in out, out
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(f"image,decision,individual_id\n{sorted(qdir.rglob('*.jpg'))[0]},match,Big Mama\n")
    out = invoke("enroll", "--decisions", decisions, "--run", run, "-q")
    assert "enrolled 1 photo" in out, out


def test_enroll_decisions_refuses_bad_rows_naming_their_lines(chain, tmp_path):
    root, run, qdir, truth = chain
    photo, second, third = sorted(qdir.rglob("*.jpg"))[:3]
    gallery_id = list(csv.DictReader(open(root / "split" / "gallery.csv")))[0]["individual_id"]
    bad = tmp_path / "decisions.csv"
    bad.write_text("image,decision,individual_id,note,viewpoint,bbox\n"
                   f"{photo},match,nobody_77,,,\n"
                   f"{photo.with_name('missing.jpg')},new,x1,,,\n"
                   f"{photo},maybe,,,,\n"
                   f"{photo.parent / 'other.jpg'},new,{gallery_id},,,\n"
                   f'{second},new,x2,,left,"1,2,inf,4"\n'
                   f"{third},unsure,,,,nonsense\n"  # left out anyway: its box is not read
                   f"{photo.parent / 'another.jpg'},new,new_individual,,,\n"  # the engine's answer is no ID
                   f"{photo.parent / 'third.jpg'},new,Big Mama,,,\n")  # the predictions would read two IDs
    r = runner.invoke(app, ["enroll", "--decisions", str(bad), "--run", str(run), "-q"])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "7 problem(s)" in text and "nothing enrolled" in text
    assert f"{bad}:9: individual_id 'Big Mama' holds a space" in text and "(write it e.g. Big_Mama)" in text
    assert f"{bad}:8: decision new needs the animal's own individual_id (new_individual is the engine's" in text
    assert f"{bad}:6: bbox '1,2,inf,4' is not four numbers" in text and f"{bad}:7" not in text
    assert f"{bad}:2: individual nobody_77 is not in the run's gallery" in text
    assert f"{bad}:3: image" in text and "not found" in text
    assert f"{bad}:4: image" in text and "more than one decision" in text
    assert f"{bad}:5: individual {gallery_id} is already in the gallery" in text
    assert not (run / "enrolled.csv").exists()


def test_run_folder_copied_without_the_gallery_photos_matches_the_same(chain, tmp_path):
    """A run folder carries its gallery: moved elsewhere, with the gallery photos gone, match gives
    the same answer with the same keypoint evidence (read from the run's cache by recorded key)."""
    root, run, qdir, truth = chain
    before = tmp_path / "before.csv"
    invoke("match", qdir, "--run", run, "--out", before, "-q")
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    photos = root / "sample"
    photos.rename(root / "sample_away")
    try:
        after = tmp_path / "after.csv"
        invoke("match", qdir, "--run", moved, "--out", after, "-q")
    finally:
        (root / "sample_away").rename(photos)
    assert before.read_text() == after.read_text()
    ev_before = json.loads(before.with_suffix(".json").read_text())["queries"]
    ev_after = json.loads(after.with_suffix(".json").read_text())["queries"]
    scores = [[c["keypoints_score"] for c in q["candidates"]] for q in ev_after]
    assert scores == [[c["keypoints_score"] for c in q["candidates"]] for q in ev_before]
    assert any(s is not None and s > 0 for q in scores for s in q)


def test_match_in_chunks_of_queries_gives_the_same_answers(chain):
    """match scores and ranks a chunk of queries at a time (bounded memory): same answers, same
    evidence, in the same order, whatever the chunk size."""
    from core.catalog import catalog_from_folder
    from engine.matching import match_records
    from engine.pipeline import Engine, MatchConfig

    root, run, qdir, truth = chain
    engine = Engine.load(run)
    records = catalog_from_folder(qdir).records
    whole, _ = match_records(engine, records, MatchConfig(), False, chunk=len(records))
    small, _ = match_records(engine, records, MatchConfig(), False, chunk=2)
    assert len(whole) == len(records) > 2
    assert [r.name for r in whole] == [r.name for r in small]
    assert [r.predictions for r in whole] == [r.predictions for r in small]
    assert [[(c.score, c.evidence.get("inliers", 0)) for c in r.candidates] for r in whole] == \
        [[(c.score, c.evidence.get("inliers", 0)) for c in r.candidates] for r in small]


def test_xfeat_lighterglue_is_one_more_stage(siamese_only):
    """XFeat + LighterGlue as a second local matcher: its own validator, cache and column, fused
    by calibrate, and chosen by name at match time."""
    root, run, qdir, truth = siamese_only
    out = invoke("train-verifier", "--run", run, "--matchers", "sift,xfeat", "--max-queries", 12, "-q")
    assert "sift verifier" in out and "xfeat verifier" in out
    assert (run / "verifier.json").is_file() and (run / "verifier-xfeat.json").is_file()
    assert any((run / "cache" / "xfeat").glob("shard-*.h5")) and any((run / "cache" / "pairs-xfeat").glob("*.h5"))
    # V = 3 and no keypoint votes (their index would be built) keep the test short: LighterGlue
    # costs ~0.1-0.2 s per pair on a CPU
    invoke("calibrate", "--run", run, "--folds", 3, "--verify-top", 3, "--votes", 0, "-q")
    cal = json.loads((run / "calibration.json").read_text())
    assert set(cal["tau"]) == {"embedding", "siamese", "keypoints", "xfeat", "fused"}
    assert cal["match"]["verify_top"] == 3
    out = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--verify-top", 3, "--votes", 0,
                 "-q")
    assert out.splitlines()[0].split() == ["metric", "embedding", "siamese", "keypoints", "xfeat", "fused",
                                           "fused:top2mean"]
    pred = root / "pred_xfeat.csv"
    invoke("match", qdir, "--run", run, "--out", pred, "--matchers", "xfeat", "--verify-top", 3, "--votes", 0, "-q")
    out = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--verify-top", 3, "--votes", 0,
                 "--matchers", "sift", "-q")
    assert out.splitlines()[0].split() == ["metric", "embedding", "siamese", "keypoints", "fused", "fused:top2mean"]
    cands = [c for q in json.loads(pred.with_suffix(".json").read_text())["queries"] for c in q["candidates"]]
    assert all("keypoints_score" not in c for c in cands)  # sift left out by --matchers
    assert any(c["xfeat_score"] is not None and c.get("xfeat_inliers", 0) > 0 for c in cands)
    # train-verifier with sift alone drops the xfeat validator it did not refit
    invoke("train-verifier", "--run", run, "--max-queries", 12, "-q")
    assert not (run / "verifier-xfeat.json").exists()


def test_same_seed_same_bytes(chain, tmp_path):
    """Two matches of the same photos (the second reading every cache the first filled) write
    byte-identical predictions and evidence."""
    root, run, qdir, truth = chain
    for name in ("a", "b"):
        invoke("match", qdir, "--run", run, "--out", tmp_path / f"{name}.csv", "-q")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert any((run / "cache" / "pairs").glob("shard-*.h5"))  # the second run read the pair cache


def shortlists_with_and_without(run, qdir, **option):
    """The engine, the queries' embeddings, and their shortlists plain and with a query-time option."""
    from core.catalog import catalog_from_folder
    from engine.pipeline import Engine, MatchConfig

    engine = Engine.load(run)
    records = catalog_from_folder(qdir).records
    emb = engine.embed(records, MatchConfig(), progress=False)
    return engine, emb, engine.shortlist(records, emb, MatchConfig(votes=0)), engine.shortlist(
        records, emb, MatchConfig(votes=0, **option))


def test_shortlist_searches_the_whitened_embeddings(chain, tmp_path):
    """train-siamese fitted the embedding's whitening on the photos of the individuals it trained on
    (never a held-out one): the shortlist is the nearest photos by the whitened cosine, which is its
    similarity; the pair head still reads the embeddings as they are. Without the file, the plain
    cosine; an unreadable one is refused, naming it."""
    from core.gallery import Gallery
    from core.whitening import Whitening
    from engine.pipeline import Engine, MatchConfig
    from siamese.embed import EmbedResult

    root, run, qdir, truth = chain
    w = Whitening.load(run / "embedding_whitening.npz")
    gallery = Gallery.load(run / "gallery.h5")
    held = set(json.loads((run / "heldout.json").read_text())["individuals"])
    from collections import Counter
    counts = Counter(i for i in gallery.ids if i not in held)  # (no viewpoints in this sample)
    assert w.correspondences == sum(c for c in counts.values() if c > 1) > 0
    engine = Engine.load(run)
    records = gallery.records()[:6]
    emb = EmbedResult(gallery.embeddings[:6], np.arange(6))
    for i, qp in enumerate(engine.shortlist(records, emb, MatchConfig(shortlist=5, votes=0))):
        white = w.apply(gallery.embeddings) @ w.apply(gallery.embeddings[i:i + 1])[0]
        white[i] = -np.inf  # (its own photo is never shortlisted)
        np.testing.assert_allclose(qp.similarity, white[qp.gallery_idx], atol=1e-5)
        np.testing.assert_allclose(qp.similarity, np.sort(white)[::-1][:5], atol=1e-5)  # the 5 nearest
    assert not np.allclose(engine.search_embeddings, gallery.embeddings)
    assert engine.stage("embedding").default_tau == 0.25  # (the whitened cosine runs lower: uncalibrated runs)
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    (plain / "embedding_whitening.npz").unlink()
    assert Engine.load(plain).stage("embedding").default_tau == 0.50
    for i, qp in enumerate(Engine.load(plain).shortlist(records, emb, MatchConfig(shortlist=5, votes=0))):
        np.testing.assert_allclose(qp.similarity, gallery.embeddings[qp.gallery_idx] @ gallery.embeddings[i],
                                   atol=1e-5)
    data = (run / "embedding_whitening.npz").read_bytes()
    small = Whitening(np.eye(4, dtype=np.float32), np.zeros(4, np.float32))
    for broken, said in ((b"not a whitening", "is unreadable"), (data[:len(data) // 2], "is unreadable"),
                         (data[:-10], "is unreadable"), (None, "whitens 4-dimensional embeddings")):
        if broken is None:
            small.save(plain / "embedding_whitening.npz")
        else:
            (plain / "embedding_whitening.npz").write_bytes(broken)
        r = runner.invoke(app, ["match", str(qdir), "--run", str(plain), "--out", str(tmp_path / "p.csv"), "-q"])
        assert r.exit_code == 2 and f"embedding_whitening.npz {said}" in r.output, r.output


def test_query_expansion_searches_with_the_averaged_query(chain):
    root, run, qdir, truth = chain
    engine, emb, plain, expanded = shortlists_with_and_without(run, qdir, query_expansion=2)
    q, first = engine.searchable(emb.embeddings)[0], plain[0]  # (the search's whitened embeddings)
    g = engine.search_embeddings[first.gallery_idx[:2]]
    w = np.clip(first.similarity[:2], 0, None) ** 3
    q2 = q + (w[:, None] * g).sum(axis=0)
    q2 /= np.linalg.norm(q2)
    sims = engine.search_embeddings[expanded[0].gallery_idx] @ q2
    np.testing.assert_allclose(expanded[0].similarity, sims, atol=1e-5)
    out = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--query-expansion", 2, "-q")
    assert "closed top-1" in out


def test_shortlist_caps_the_photos_of_one_individual(chain):
    """--per-individual N: each individual's N most similar photos at most, searched deep enough that
    the shortlist still holds K photos; the order is the uncapped one."""
    from core.catalog import catalog_from_folder
    from engine.pipeline import Engine, MatchConfig

    root, run, qdir, truth = chain
    engine = Engine.load(run)
    ids = engine.gallery.ids
    records = catalog_from_folder(qdir).records
    emb = engine.embed(records, MatchConfig(), progress=False)
    everything = engine.shortlist(records, emb, MatchConfig(shortlist=len(ids), votes=0))
    for cap, k in ((1, 3), (2, 5), (1, 100)):
        capped = engine.shortlist(records, emb, MatchConfig(shortlist=k, per_individual=cap, votes=0))
        for full, short in zip(everything, capped):
            seen, expected = {}, []
            for g in full.gallery_idx:
                seen[ids[g]] = seen.get(ids[g], 0) + 1
                if seen[ids[g]] <= cap:
                    expected.append(g)
            assert list(short.gallery_idx) == expected[:k]
            assert cap > 1 or len(expected) < len(full.gallery_idx)  # the cap left photos out
    out = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--per-individual", 1, "-q")
    assert "closed top-1" in out


def test_shortlist_cap_searches_deeper_until_k_remain(chain, monkeypatch, caplog):
    """Three individuals with 150 photos each nearest the query, 20 with one photo further out: with
    one photo per individual, K = 10 needs 7 of the far ones, beyond the first depths searched; a
    query whose viewpoint has only 5 photos stops when they run out."""
    from core.catalog import Record
    from core.gallery import Gallery
    from engine import pipeline
    from engine.pipeline import Engine, MatchConfig
    from siamese.embed import EmbedResult

    root, run, qdir, truth = chain
    engine = Engine.load(run)
    rng = np.random.default_rng(0)
    d = engine.gallery.embeddings.shape[1]
    q = rng.normal(size=d)
    q /= np.linalg.norm(q)
    ids = [f"big{i}" for i in range(3) for _ in range(150)] + [f"one{i}" for i in range(20)]
    spread = np.array([0.3] * 450 + [3.0] * 20)[:, None]
    emb = q + spread * rng.normal(size=(len(ids), d)) / np.sqrt(d)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    views = ["left"] * 465 + ["right"] * 5
    engine.whitening = None  # (searched as they are)
    engine.set_gallery(Gallery(paths=[f"/nowhere/{i}.jpg" for i in range(len(ids))], ids=ids, viewpoints=views,
                               bboxes=np.full((len(ids), 4), -1), embeddings=emb))
    records = [Record(image=f"{v}.jpg", path=Path(f"/nowhere/q-{v}.jpg"), individual_id=None, viewpoint=v)
               for v in ("left", "right")]
    queries = EmbedResult(np.stack([q, q]).astype(np.float32), np.arange(2))

    def expected(view, k):
        order = [int(g) for g in np.argsort(-(emb @ q), kind="stable") if views[g] == view]
        return [g for n, g in enumerate(order) if ids[g] not in {ids[h] for h in order[:n]}][:k]

    left, right = engine.shortlist(records, queries, MatchConfig(shortlist=10, per_individual=1))
    assert sorted(ids[g] for g in left.gallery_idx[:3]) == ["big0", "big1", "big2"]
    assert list(left.gallery_idx) == expected("left", 10) and len(left.gallery_idx) == 10
    assert list(right.gallery_idx) == expected("right", 10) and len(right.gallery_idx) == 5
    monkeypatch.setattr(pipeline, "CAP_MAX_DEPTH", 100)  # too shallow to reach the far photos: said so
    with caplog.at_level("INFO", logger="engine.pipeline"):
        left, _ = engine.shortlist(records, queries, MatchConfig(shortlist=10, per_individual=1))
    assert len(left.gallery_idx) < 10 and "keep fewer than 10 photos among their 100 nearest" in caplog.text


def test_shortlist_leaves_out_the_queries_own_gallery_photo(chain, tmp_path):
    """Calibration queries are gallery photos: each one's own photo never enters its shortlist, also
    when its path does not match the gallery's (`own`), and with query expansion."""
    from engine.pipeline import Engine, MatchConfig
    from siamese.embed import EmbedResult

    root, run, qdir, truth = chain
    engine = Engine.load(run)
    g = engine.gallery
    picks = np.arange(0, len(g), 7)
    records = []
    for i in picks:  # the same photo under another path
        rec = g.record(int(i))
        copy = tmp_path / f"{i}{Path(rec.path).suffix}"
        shutil.copy(rec.path, copy)
        records.append(dataclasses.replace(rec, path=copy, image=str(copy)))
    emb = EmbedResult(g.embeddings[picks], np.arange(len(picks)))
    for cfg in (MatchConfig(), MatchConfig(query_expansion=2), MatchConfig(votes=3)):
        by_path = engine.shortlist(records, emb, cfg)
        assert any(i in p.gallery_idx for i, p in zip(picks, by_path))  # the path check alone misses them
        left_out = engine.shortlist(records, emb, cfg, own=picks)
        for i, p in zip(picks, left_out):
            assert i not in p.gallery_idx
            assert len(p.gallery_idx) == min(cfg.shortlist, len(g) - 1)


def test_keypoint_votes_join_the_shortlist_and_are_verified(chain, caplog):
    """--votes L: each query's L gallery photos with the most keypoint votes (among those it may
    meet) join the embedding's shortlist after its photos, share the --verify-top verifications with
    the embedding's ranking (alternating), and the calibration holds for the setting it was fitted
    with."""
    from core.cache import record_key
    from core.catalog import catalog_from_folder
    from engine.pipeline import Engine, MatchConfig

    root, run, qdir, truth = chain
    engine = Engine.load(run)
    records = catalog_from_folder(qdir).records
    emb = engine.embed(records, MatchConfig(), progress=False)
    assert len(emb.ok) == len(records)
    index = engine.vote_index()
    kps = engine.stage("keypoints").store.get(records, progress=False)
    n = len(engine.gallery)
    subset = np.arange(0, n, 2)
    in_subset = np.isin(np.arange(n), subset)
    grew = 0
    for gallery_subset, allowed in ((None, np.ones(n, bool)), (subset, in_subset)):
        plain = engine.shortlist(records, emb, MatchConfig(shortlist=2, votes=0), gallery_subset)
        voted = engine.shortlist(records, emb, MatchConfig(shortlist=2, votes=4), gallery_subset)
        for i, (rec, p, v) in enumerate(zip(records, plain, voted)):
            votes = index.votes(kps[record_key(rec)].desc, allowed)
            top = [g for g in np.argsort(-votes, kind="stable")[:4] if votes[g] > 0]
            assert list(v.gallery_idx[:2]) == list(p.gallery_idx)  # the embedding's photos first, in order
            assert list(v.gallery_idx[v.voted]) == top and set(v.gallery_idx) == set(p.gallery_idx) | set(top)
            assert allowed[v.gallery_idx].all()
            np.testing.assert_allclose(v.similarity, engine.search_embeddings[v.gallery_idx]
                                       @ engine.searchable(emb.embeddings)[i], atol=1e-5)
            grew += len(v.gallery_idx) > 2
    assert grew  # votes found photos that the embedding's shortlist did not hold
    for rec, qp in zip(records, engine.pair_scores(records, emb, MatchConfig(shortlist=2, votes=4, verify_top=3))):
        # V = 3 verifications: the embedding's best, the most voted, then the next of either
        verified = set(np.flatnonzero(~np.isnan(qp.stages["keypoints"])).tolist())
        order = np.argsort(-engine.pre_scores(qp.stages), kind="stable").tolist()
        turns = [p for pair in zip(order, qp.voted.tolist()) for p in pair] + order  # in turn, then the rest
        assert verified == set(list(dict.fromkeys(turns))[:3])
        assert len(verified) == min(3, len(qp.gallery_idx)) and order[0] in verified
        # the votes stage: log(1 + votes) of every shortlisted photo, whoever proposed it
        votes = index.votes(kps[record_key(rec)].desc, np.ones(n, bool))
        np.testing.assert_allclose(qp.stages["votes"], np.log1p(votes[qp.gallery_idx]))
    plain = engine.pair_scores(records, emb, MatchConfig(shortlist=2, votes=0))
    assert all(np.isnan(qp.stages["votes"]).all() and len(qp.gallery_idx) == 2 for qp in plain)
    out = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--votes", 4, "-q")
    assert "closed top-1" in out and out.split()[1] == "votes" and re.search(r"seconds per query: .*votes \d", out)
    invoke("calibrate", "--run", run, "--votes", 4, "-q")
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["match"]["votes"] == 4 and "votes" in cal["fusion"]["stages"]  # calibrated and fused
    logging.getLogger().handlers = [caplog.handler]  # the CLI's logging setup replaced pytest's
    with caplog.at_level("WARNING", logger="engine.pipeline"):
        Engine.load(run).tau(MatchConfig(votes=0))
    assert "--votes 4" in caplog.text and "--votes 0" in caplog.text
    # evaluated with --votes 0, a run calibrated with votes shows no votes column (the scores of nothing)
    out0 = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--votes", 0, "-q")
    header = next(line for line in out0.splitlines() if line.startswith("metric")).split()
    assert header[1:] == ["embedding", "siamese", "keypoints", "fused", "fused:top2mean"], out0
    # --votes 0 calibrates without the votes stage (nothing to fit: it does not score)
    invoke("calibrate", "--run", run, "--votes", 0, "-q")
    cal0 = json.loads((run / "calibration.json").read_text())
    assert "votes" not in cal0["stages"] and "votes" not in cal0["fusion"]["stages"] and "keypoints" in cal0["stages"]
    # likewise the keypoint stage with --verify-top 0 (it verifies nothing)
    out0 = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--votes", 0, "--verify-top", 0, "-q")
    header = next(line for line in out0.splitlines() if line.startswith("metric")).split()
    assert header[1:] == ["embedding", "siamese", "fused", "fused:top2mean"], out0
    # a calibration fitted when voted photos were verified beyond --verify-top (no votes_rule) warns,
    # once; one with the rule does not
    del cal["match"]["votes_rule"]
    (run / "calibration.json").write_text(json.dumps(cal))
    logging.getLogger().handlers = [caplog.handler]  # calibrate's logging setup replaced it again
    caplog.clear()
    with caplog.at_level("WARNING", logger="engine.pipeline"):
        old = Engine.load(run)
        old.tau(MatchConfig(votes=4))
        old.tau(MatchConfig(votes=4))
    assert caplog.text.count("verified the voted photos on top of --verify-top") == 1
    cal["match"]["votes_rule"] = "share_v"
    (run / "calibration.json").write_text(json.dumps(cal))
    caplog.clear()
    with caplog.at_level("WARNING", logger="engine.pipeline"):
        Engine.load(run).tau(MatchConfig(votes=4))
    assert "on top of --verify-top" not in caplog.text


def test_embedding_score_per_individual_is_calibrated_and_recorded(chain, caplog):
    """--individual-weight W: the embedding stage's score is (1 - W) x the cosine to the photo + W x the
    cosine to the mean of its individual's photos of its viewpoint (as searched); calibrate fits
    INDIVIDUAL_WEIGHT and records it, match uses the calibration's, and a calibration from before the
    setting keeps the photo's cosine alone."""
    from core.catalog import catalog_from_folder
    from engine.config import INDIVIDUAL_WEIGHT
    from engine.pipeline import Engine, MatchConfig
    from siamese.embed import EmbedResult

    root, run, qdir, truth = chain
    engine = Engine.load(run)
    assert engine.calibration is None and engine.individual_weight(MatchConfig()) == 0
    records = catalog_from_folder(qdir).records
    emb = engine.embed(records, MatchConfig(), progress=False)
    q = engine.searchable(emb.embeddings)
    ids = np.asarray(engine.gallery.ids, dtype=object)
    views = np.asarray([v or "" for v in engine.gallery.viewpoints], dtype=object)
    plain = engine.pair_scores(records, emb, MatchConfig(individual_weight=0, verify_top=0))
    half = engine.pair_scores(records, emb, MatchConfig(individual_weight=0.5, verify_top=0))
    differ = 0
    for i, (p, h) in enumerate(zip(plain, half)):
        assert p.individual is None and list(p.gallery_idx) == list(h.gallery_idx)
        np.testing.assert_allclose(p.stages["embedding"], p.similarity)
        mean = [engine.search_embeddings[(ids == ids[g]) & (views == views[g])].sum(axis=0) for g in h.gallery_idx]
        individual = np.array([m @ q[i] / np.linalg.norm(m) for m in mean])
        np.testing.assert_allclose(h.stages["embedding"], 0.5 * p.similarity + 0.5 * individual, atol=1e-5)
        np.testing.assert_allclose(h.stages["siamese"], p.stages["siamese"])  # the other stages as they were
        differ += not np.allclose(individual, p.similarity, atol=1e-4)
    assert differ  # individuals with several photos: the mean is not the photo
    # calibration's queries are gallery photos, in a fold's gallery subset: the means are over the subset,
    # the query's own photo left out
    g = engine.gallery
    picks = np.arange(0, len(g), 5)
    subset = np.setdiff1d(np.arange(len(g)), np.arange(1, len(g), 3))
    fold = engine.shortlist([g.record(int(i)) for i in picks], EmbedResult(g.embeddings[picks], np.arange(len(picks))),
                            MatchConfig(individual_weight=0.5), gallery_subset=subset, own=picks)
    in_subset = np.isin(np.arange(len(g)), subset)
    for i, qp in zip(picks, fold):
        keep = in_subset.copy()
        keep[i] = False
        mean = [engine.search_embeddings[keep & (ids == ids[j]) & (views == views[j])].sum(axis=0) for j in qp.gallery_idx]
        expected = [m @ engine.search_embeddings[i] / np.linalg.norm(m) for m in mean]
        np.testing.assert_allclose(qp.individual, expected, atol=1e-5)
    invoke("calibrate", "--run", run, "-q")
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["match"]["individual_weight"] == INDIVIDUAL_WEIGHT > 0
    logging.getLogger().handlers = [caplog.handler]  # the CLI's logging setup replaced pytest's
    caplog.clear()
    with caplog.at_level("WARNING", logger="engine.pipeline"):
        engine = Engine.load(run)
        assert engine.individual_weight(MatchConfig()) == INDIVIDUAL_WEIGHT
        engine.tau(MatchConfig())
        assert not caplog.text
        engine.tau(MatchConfig(individual_weight=0))
        assert f"--individual-weight {INDIVIDUAL_WEIGHT}" in caplog.text and "--individual-weight 0.0" in caplog.text
        caplog.clear()
        # a calibration from before the setting: its fusion was fitted on the photo's cosine alone
        del cal["match"]["individual_weight"]
        (run / "calibration.json").write_text(json.dumps(cal))
        old = Engine.load(run)
        assert old.individual_weight(MatchConfig()) == 0
        old.tau(MatchConfig())
        assert not caplog.text
        assert all(qp.individual is None for qp in old.pair_scores(records, emb, MatchConfig(verify_top=0)))
    # calibrate fits the default, not the weight of the calibration it replaces; or the one asked for
    invoke("calibrate", "--run", run, "-q")
    assert json.loads((run / "calibration.json").read_text())["match"]["individual_weight"] == INDIVIDUAL_WEIGHT
    invoke("calibrate", "--run", run, "--individual-weight", 0, "-q")
    assert json.loads((run / "calibration.json").read_text())["match"]["individual_weight"] == 0


def test_k_reciprocal_rerank_reorders_the_shortlist(chain):
    from ranker.rerank import gallery_reciprocal_sets, k_reciprocal_rescore

    root, run, qdir, truth = chain
    engine, _, plain, reranked = shortlists_with_and_without(run, qdir, rerank=3)
    # the same by brute force: the gallery's 3 nearest neighbours from the full similarity matrix
    g = engine.search_embeddings
    sim = g @ g.T
    np.fill_diagonal(sim, -np.inf)
    near = np.argsort(-sim, axis=1, kind="stable")[:, :3]
    kth = np.take_along_axis(sim, near[:, -1:], axis=1)[:, 0]
    for p, r in zip(plain, reranked):
        s, i = k_reciprocal_rescore(p.similarity, p.gallery_idx, kth, gallery_reciprocal_sets(near), 3)
        assert sorted(r.gallery_idx.tolist()) == sorted(p.gallery_idx.tolist())  # the same photos
        np.testing.assert_array_equal(r.gallery_idx, i)
        np.testing.assert_allclose(r.similarity, s, atol=1e-5)
    assert any((p.gallery_idx != r.gallery_idx).any() for p, r in zip(plain, reranked))
    out = invoke("evaluate", "--catalog", truth, "--images", qdir, "--run", run, "--rerank", 3, "-q")
    assert "closed top-1" in out


def test_run_folder_and_photos_moved_together_find_each_other(tmp_path):
    """gallery.h5 stores paths relative to the images root of config.json: a project folder (photos +
    run) copied elsewhere, the original gone, still resolves every gallery photo in its new place."""
    project = tmp_path / "project"
    catalog = make_dataset(project / "photos", n_individuals=4, photos_per_individual=2, seed=3, size=(96, 128))
    invoke("train-siamese", "--catalog", catalog, "--out", project / "runs" / "r", "--epochs", 0,
           "--input-size", "64x96", "-q")
    cfg = json.loads((project / "runs" / "r" / "config.json").read_text())
    assert cfg["images_root"] == str((project / "photos").resolve()) and cfg["images_root_from_run"] == "../../photos"
    import h5py
    with h5py.File(project / "runs" / "r" / "gallery.h5") as f:
        stored = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][()]]
    assert stored and not any(Path(p).is_absolute() for p in stored)
    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(project, moved)
    shutil.rmtree(project)
    from engine.pipeline import Engine
    engine = Engine.load(moved / "runs" / "r")
    assert all(Path(p).is_file() and str(moved) in p for p in engine.gallery.paths)
    q = tmp_path / "q"
    q.mkdir()
    shutil.copyfile(engine.gallery.paths[0], q / "x.jpg")
    invoke("match", q, "--run", moved / "runs" / "r", "--out", tmp_path / "p.csv", "-q")
    ev = json.loads((tmp_path / "p.json").read_text())
    assert ev["queries"][0]["candidates"][0]["gallery_image"].startswith(str(moved))


def test_train_verifier_focus_is_recorded_and_read_back(trained, tmp_path):
    """The default keeps SIFT keypoints where the focus map sees the animal; `--focus 1` the whole
    photo. config.json records the share and a loaded run extracts new photos the same way."""
    from engine.pipeline import Engine

    _, siamese_run, verified, _, _ = trained
    assert json.loads((verified / "config.json").read_text())["keypoints"]["focus_keep"] == 0.5
    assert Engine.load(verified).stage("keypoints").focus is not None
    run = tmp_path / "run"
    shutil.copytree(siamese_run, run)
    invoke("train-verifier", "--run", run, "--focus", 1, "--max-queries", 20, "-q")
    # recorded as before the focus existed: runs of that time keep their caches and settings
    assert "focus_keep" not in json.loads((run / "config.json").read_text())["keypoints"]
    assert Engine.load(run).stage("keypoints").focus is None
    r = runner.invoke(app, ["train-verifier", "--run", str(run), "--focus", "0", "-q"])
    assert r.exit_code == 2 and "--focus" in r.output


def test_complete_verifies_every_photo_of_the_best_individuals(chain, caplog, monkeypatch):
    """--complete N: after the --verify-top checks, the photos of the N individuals whose checked photos
    scored best (the keypoint stage's score, per individual its best photo) that the query may meet and
    that were not checked are checked: those in the shortlist by the keypoint stage, the others join it
    and every stage scores them; what was scored stays as it was. Never the query's own photo, never
    outside a fold's gallery subset, at most COMPLETE_PHOTOS per individual (the nearest in the
    embedding). Calibrate records it."""
    import engine.pipeline as pipeline
    from core.aggregate import aggregate_per_individual
    from core.catalog import catalog_from_folder
    from engine.pipeline import Engine, MatchConfig
    from siamese.embed import EmbedResult

    root, run, qdir, truth = chain
    engine = Engine.load(run)
    ids = np.asarray(engine.gallery.ids)
    n = len(engine.gallery)
    records = catalog_from_folder(qdir).records
    emb = engine.embed(records, MatchConfig(), progress=False)
    own = np.arange(0, n, 5)  # gallery photos as queries, as calibrate's folds ask: never matched with themselves
    cases = [(records, emb, None, None, 10),
             (records, emb, np.arange(0, n, 2), None, 10),
             ([engine.gallery.record(int(g)) for g in own], EmbedResult(engine.gallery.embeddings[own],
                                                                       np.arange(len(own))), None, own, 10),
             (records, emb, None, None, 1)]  # one photo per individual: the nearest unchecked one
    plain_cfg = MatchConfig(shortlist=3, votes=0, verify_top=2)
    added_any = shortlisted_any = capped = 0
    for recs, e, subset, mine, cap in cases:
        monkeypatch.setattr(pipeline, "COMPLETE_PHOTOS", cap)
        plain = engine.pair_scores(recs, e, plain_cfg, gallery_subset=subset, own=mine)
        done = engine.pair_scores(recs, e, MatchConfig(shortlist=3, votes=0, verify_top=2, complete=2),
                                  gallery_subset=subset, own=mine)
        allowed = np.ones(n, bool) if subset is None else np.isin(np.arange(n), subset)
        query_emb = engine.searchable(e.embeddings)
        for qi, (p, d) in enumerate(zip(plain, done)):
            k = len(p.gallery_idx)
            assert list(d.gallery_idx[:k]) == list(p.gallery_idx)
            checked = set(p.gallery_idx[~np.isnan(p.stages["keypoints"])].tolist())
            best = {b.individual_id for b in aggregate_per_individual(ids[p.gallery_idx], p.stages["keypoints"])[:2]}
            want = []
            for ind in sorted(best):
                photos = [g for g in range(n) if ids[g] == ind and allowed[g] and g not in checked
                          and (mine is None or g != mine[qi])]
                near = sorted(photos, key=lambda g: -float(engine.search_embeddings[g] @ query_emb[qi]))
                want += near[:cap]
                capped += len(near) > cap
            in_list = [g for g in want if g in p.gallery_idx]
            assert sorted(d.gallery_idx[k:].tolist()) == sorted(set(want) - set(in_list))
            now_checked = set(d.gallery_idx[~np.isnan(d.stages["keypoints"])].tolist())
            assert now_checked == checked | set(want)  # the best individuals' photos, and no other one
            for name in ("embedding", "siamese"):  # what was scored stays; the added photos are scored
                np.testing.assert_array_equal(d.stages[name][:k], p.stages[name])
                assert not np.isnan(d.stages[name][k:]).any()
            was = ~np.isnan(p.stages["keypoints"])
            np.testing.assert_array_equal(d.stages["keypoints"][:k][was], p.stages["keypoints"][was])
            np.testing.assert_allclose(d.similarity[k:], engine.search_embeddings[d.gallery_idx[k:]]
                                       @ query_emb[qi], atol=1e-5)
            added_any += len(d.gallery_idx) - k
            shortlisted_any += len(in_list)
    # the shortlists of 3 (2 checked) left photos of the best individuals, and more than one of some
    assert added_any and shortlisted_any and capped
    monkeypatch.undo()
    invoke("calibrate", "--run", run, "--complete", 2, "-q")
    assert json.loads((run / "calibration.json").read_text())["match"]["complete"] == 2
    logging.getLogger().handlers = [caplog.handler]  # the CLI's logging setup replaced pytest's
    with caplog.at_level("WARNING", logger="engine.pipeline"):
        Engine.load(run).tau(MatchConfig(complete=0))
    assert "--complete 2" in caplog.text and "--complete 0" in caplog.text


def test_a_copy_of_a_gallery_photo_is_found_first_and_certain(chain, tmp_path):
    """A query that is a gallery photo again (the same file, or the photo saved again at another size
    and JPEG quality) gets its animal first, and the keypoint stage is certain of the pair
    (keypoints.verify.same_photo): the validator never learns from such pairs, where every keypoint is
    an inlier, and scored them below other photos of the animal. The summary line, the JSON
    (`same_photo`) and the review page say which photos the catalog holds already; a new photo is not one."""
    from engine.pipeline import Engine
    from keypoints.verify import SAME_PHOTO_PROBABILITY

    root, run, qdir, truth = chain
    g = Engine.load(run).gallery
    copies = tmp_path / "copies"
    copies.mkdir()
    picks = {}
    for i in range(0, len(g), max(1, len(g) // 4)):
        path = Path(g.record(i).path)
        shutil.copy(path, copies / f"same_{i}{path.suffix}")
        img = cv2.imread(str(path))
        h, w = img.shape[:2]
        cv2.imwrite(str(copies / f"resaved_{i}.jpg"), cv2.resize(img, (w * 9 // 10, h * 9 // 10)),
                    [cv2.IMWRITE_JPEG_QUALITY, 85])
        picks[f"same_{i}{path.suffix}"] = picks[f"resaved_{i}.jpg"] = i
    other = sorted(qdir.iterdir())[0]  # a photo the gallery does not hold
    shutil.copy(other, copies / other.name)
    out = tmp_path / "p.csv"
    said = invoke("match", copies, "--run", run, "--out", out, "--report", tmp_path / "review.html", "-q")
    # the summary counts the photos the catalog holds already, and the JSON and the review page name them
    assert f", {len(picks)} the same photo as a gallery photo (same_photo in the JSON)" in said, said
    queries = {q["image"]: q for q in json.loads(out.with_suffix(".json").read_text())["queries"]}
    assert len(queries) == len(picks) + 1 and len(picks) >= 8
    assert not any(c.get("same_photo") for c in queries.pop(other.name)["candidates"])
    for name, q in queries.items():
        i = picks[name]
        assert q["predictions"][0] == g.ids[i], q
        first = q["candidates"][0]
        assert first["keypoints_score"] == SAME_PHOTO_PROBABILITY and first["inliers"] >= 30, first
        assert first["score"] == max(c["score"] for c in q["candidates"]) and first["same_photo"] is True
        assert not any(c.get("same_photo") for c in q["candidates"][1:])
    shown = [c["name"] for q in page_data((tmp_path / "review.html").read_text())["queries"] for c in q["candidates"]]
    assert sum(name.endswith(" (the same photo)") for name in shown) == len(picks), shown


def test_the_evidence_json_of_an_out_not_ending_in_csv_keeps_its_whole_name():
    """`--out survey_2024.05` and `--out survey_2024.06` once shared survey_2024.json: the second replaced the
    first's evidence."""
    from engine.pipeline import evidence_path
    assert evidence_path(Path("o/p.csv")) == Path("o/p.json") and evidence_path(Path("o/P.CSV")) == Path("o/P.json")
    assert evidence_path(Path("o/survey_2024.05")) == Path("o/survey_2024.05.json")
    assert evidence_path(Path("o/week1")) == Path("o/week1.json")
