#!/usr/bin/env python3
"""Accuracy on the development set (nyala flank photos: --data), following the evaluation protocol
(its split.py and score.py: --protocol). Neither is distributed with the engine (the photos have no
licence to redistribute); by default both are looked for beside the repository ($NYALA_DATA, if set,
for the photos).

One seeded open-set split (the protocol's split.py: sightings kept together, ~20% of individuals
unseen), then side by side in one run:
  baseline   pretrained mobilenetv2_100 embedding, epochs 0 (the retrieval baseline)
  trained    the engine after train-siamese (budget --train-minutes) [+ train-verifier + calibrate]
with each stage's ranking (embedding, siamese, keypoints, fused) scored by the protocol's metrics,
and the query-time options (query expansion, k-reciprocal re-ranking, one photo per individual in the
shortlist) beside them.
The flank side from metadata.csv is given as `viewpoint` to the gallery and the queries: a
researcher knows which flank a photo shows.
Prints a table and writes bench/results/accuracy.json (and a copy in --work, kept when runs go in parallel).

  python bench/accuracy.py [--train-minutes 20] [--work /tmp/bench-accuracy] [--seed 0]
                           [--keypoints default,kp1500]  # keypoint presets side by side, one network
                           [--votes 0,20,20:20,100:300:200]  # keypoint votes[:V[:K]] side by side, one verified network
                           [--whitening on,off]  # SIFT descriptors whitened or not, one network
                           [--inlier-weights off,on]  # the validator reads inlier weights or not, one network
                           [--mirror off,on]  # embeddings with their mirror image's or not, one network
                           [--views box,box+centre+photo]  # the views of a photo embedded (+ joins them), one network
                           [--network average,best]  # averaged weights or the best epoch's, one training
                           [--embedding-whitening off,on]  # the shortlist searches whitened embeddings or not, one network
                           [--individual-weight 0.25,0]  # embedding score a share per individual or not, one network
                           [--vote-weights on,off]  # keypoint votes weighted by the model of inliers or not, one network
                           [--complete 0,5]  # the photos of the N best verified individuals verified too, one network
                           [--verifier-queries 600,2000]  # train-verifier --max-queries side by side, one network
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe, headline  # noqa: E402
from core.catalog import load_catalog  # noqa: E402
from core.runfolder import RunFolder, atomic_write_json, read_json  # noqa: E402
from engine.matching import evaluate_pairs, format_metrics, format_places, right_animal_places  # noqa: E402
from engine.pipeline import (Engine, MatchConfig, fitted_settings, match_settings_of, votes_rule_stale,  # noqa: E402
                             calibration_changes, write_predictions)
from ranker.fusion import FUSED  # noqa: E402
from core.runtime import set_threads  # noqa: E402
from siamese.config import views_problem  # noqa: E402
from siamese.model import ModelConfig  # noqa: E402
from engine.config import INDIVIDUAL_WEIGHT, VOTE_WEIGHTS, VerifierTrainConfig  # noqa: E402
from engine import train_siamese  # noqa: E402
from engine.train_siamese import TrainConfig, heldout_roles  # noqa: E402
from keypoints.features import PRESETS as KEYPOINT_PRESETS, config_to_dict  # noqa: E402

# set from --data and --protocol by main()
DATA = Path(os.environ.get("NYALA_DATA") or ROOT.parent / "shared" / "data" / "nyala")  # the development set
PROTOCOL = ROOT.parent / "shared" / "protocol"
log = logging.getLogger("bench.accuracy")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_split(work: Path, seed: int) -> tuple[Path, Path, Path, Path]:
    """The protocol's split, plus viewpoint columns recovered from metadata.csv."""
    split = work / "split"
    source = {"data": str(DATA.resolve()), "seed": seed}
    if (split / "truth.csv").is_file():
        made = json.loads((split / "source.json").read_text()) if (split / "source.json").is_file() else source
        if made != source:
            sys.exit(f"{split} is the split of {made} (--data, --seed), not of {source}: give another --work")
    else:
        subprocess.run([sys.executable, str(PROTOCOL / "split.py"), str(DATA), str(split), str(seed)],
                       check=True)
    (split / "source.json").write_text(json.dumps(source) + "\n")
    with open(DATA / "metadata.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    side = {r["image"]: r["side"] for r in meta}
    by_hash = {md5(DATA / r["image"]): r["image"] for r in meta}
    gallery_vp = split / "gallery_viewpoint.csv"
    with open(split / "gallery.csv", newline="") as f, open(gallery_vp, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["image", "individual_id", "viewpoint"])
        for r in csv.DictReader(f):
            w.writerow([r["image"], r["individual_id"], side[r["image"]]])
    queries_vp = split / "queries_viewpoint.csv"
    with open(split / "truth.csv", newline="") as f, open(queries_vp, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["image", "viewpoint"])
        for r in csv.DictReader(f):
            w.writerow([r["image"], side[by_hash[md5(split / "queries" / r["image"])]]])
    return gallery_vp, split / "queries", queries_vp, split / "truth.csv"


def read_truth(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {r["image"]: r["individual_id"] for r in csv.DictReader(f)}


# query-time options shown beside the defaults (engine.config.MatchConfig)
OPTIONS = {"qe10": {"query_expansion": 10}, "rerank20": {"rerank": 20}, "cap1": {"per_individual": 1}}


def evaluate_run(run: Path, queries_dir: Path, queries_csv: Path, truth: dict, out_dir: Path,
                 label: str, options: bool = True, cfg: MatchConfig = MatchConfig()) -> tuple[dict, dict]:
    """Each stage's ranking of the same shortlists, scored; the engine's full answer is written."""
    engine = Engine.load(run)
    records = load_catalog(queries_csv, queries_dir, require_labels=False).records
    t0 = time.perf_counter()
    emb = engine.embed(records, cfg, progress=False)
    pairs = engine.pair_scores(records, emb, cfg)
    seconds = time.perf_counter() - t0
    rows = {f"{label}:{name}": m for name, m in evaluate_pairs(engine, pairs, truth, cfg).items()}
    results = engine.rank(pairs, engine.tau(cfg))  # the engine's own answer
    pred = out_dir / f"predictions_{label}.csv"
    write_predictions(results, pred, {"run": str(run)})
    timing = {"query_seconds": seconds / len(records), "right_animal": right_animal_places(engine, pairs, truth),
              "stage_seconds_per_query": {k: round(v / len(records), 4) for k, v in engine.seconds.items()},
              "embed_images_per_s": emb.images_per_second if emb.computed else None}  # None: all cached
    # query-time options, each on its own shortlists: the embedding's ranking and the engine's
    first = "embedding"  # the shortlist's own ranking
    for option, changes in OPTIONS.items() if options else ():
        ocfg = dataclasses.replace(cfg, **changes)
        option_rows = evaluate_pairs(engine, engine.pair_scores(records, emb, ocfg), truth, ocfg)
        rows.update({f"{label}:{name}+{option}": option_rows[name] for name in (first, FUSED)})
    return rows, {"predictions": str(pred), **timing}


def main() -> None:
    global DATA, PROTOCOL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-accuracy"), help="runs and splits go here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-minutes", type=float, default=20.0)
    ap.add_argument("--epochs", type=int, default=40, help="upper bound; the time budget usually stops first")
    ap.add_argument("--input-size", default="224x224")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--freeze-blocks", type=int, default=TrainConfig.freeze_blocks,
                    help="train with the backbone's stem and first N stages frozen (another count than the "
                    "default: run label trained_freezeN)")
    ap.add_argument("--matchers", default="sift", help="local matchers to train and compare: sift, xfeat")
    ap.add_argument("--reuse", action="store_true", help="reuse what run folders in --work have: a trained network, "
                    "a verifier, a calibration (the missing steps run)")
    ap.add_argument("--keypoints", default="default",
                    help="keypoint presets (keypoints.features.PRESETS) to compare on the same trained network: "
                    "the first is the run's own; each other one verifies and calibrates a copy of it (run label "
                    "trained@PRESET; the query-time options are measured on the first only)")
    ap.add_argument("--votes", default=str(MatchConfig.votes),
                    help="keypoint-vote settings VOTES[:V[:K]] (match --votes, --verify-top, --shortlist; V "
                    f"default {MatchConfig.verify_top}, K {MatchConfig.shortlist}) to compare on the same trained "
                    "and verified network: the first is the run's own; each other one calibrates a copy of it (run "
                    "label trained+votesN, trained+votesNvV, trained+votesNvVkK)")
    ap.add_argument("--whitening", default="on" if VerifierTrainConfig.whitening else "off",
                    help="on / off: train-verifier --whitening / --no-whitening; 'on,off' compares both on the same "
                    "trained network: the first is the run's own, the other verifies and calibrates a copy of it "
                    "(run label trained+whiten-SETTING, sharing the run's caches)")
    ap.add_argument("--inlier-weights", default="on" if VerifierTrainConfig.inlier_weights else "off",
                    help="on / off: train-verifier --inlier-weights / --no-inlier-weights; 'off,on' compares both on "
                    "the same trained network: the first is the run's own, the other verifies and calibrates a copy "
                    "of it (run label trained+iweights-SETTING, sharing the run's caches)")
    ap.add_argument("--mirror", default="on" if ModelConfig.mirror else "off",
                    help="on / off: train-siamese --mirror / --no-mirror (each photo embedded as the mean of its "
                    "features and its mirror image's); 'off,on' compares both on the same trained and verified "
                    "network: the first is the run's own, the other re-embeds the gallery of a copy of it and "
                    "calibrates it (run label trained+mirror-SETTING)")
    ap.add_argument("--views", default="+".join(ModelConfig.views),
                    help="the views of each photo embedded, their features averaged (train-siamese --views; views "
                    "joined by +, e.g. box+centre+photo); 'box,box+centre+photo' compares them on the same trained "
                    "and verified network: the first is the run's own, each other one re-embeds the gallery of a "
                    "copy of it and calibrates it (run label trained+views-box+centre+photo)")
    ap.add_argument("--network", default="best" if TrainConfig.average_from is None else "average",
                    help="average / best: the network train-siamese keeps (the mean of the weights of its last "
                    "epochs, or the epoch with the best validation MAP@5); 'average,best' compares both from one "
                    "training: the first is the run's own, the other the same training's other network (from its "
                    "checkpoint) in a copy of it, verified and calibrated (run label trained+network-SETTING); each is "
                    "calibrated on the held-out individuals that did not choose it: all of them for the average, all "
                    "but the validation half for the best epoch")
    ap.add_argument("--embedding-whitening", default="on" if TrainConfig.whiten_embedding else "off",
                    help="on / off: train-siamese --whiten-embedding / --no-whiten-embedding (the shortlist searches "
                    "embeddings whitened on the training individuals' photos); 'off,on' compares both on the same "
                    "trained and verified network: the first is the run's own, the other fits or removes the "
                    "whitening in a copy of it and calibrates it (run label trained+ewhiten-SETTING)")
    ap.add_argument("--individual-weight", default=str(INDIVIDUAL_WEIGHT),
                    help="shares of the embedding's score that are the cosine to the candidate individual's mean "
                    "(calibrate / match --individual-weight), comma-separated, e.g. '0.25,0': the first is the "
                    "run's own; each other one calibrates a copy of the same verified network (run label "
                    "trained+indivW)")
    ap.add_argument("--vote-weights", default="on" if VOTE_WEIGHTS else "off",
                    help="on / off: calibrate / match --vote-weights / --no-vote-weights (keypoint votes weighted by "
                    "the verifier's model of inliers); 'on,off' compares both on the same verified network: the "
                    "first is the run's own, the other calibrates a copy of it (run label trained+vweights-SETTING)")
    ap.add_argument("--complete", default=str(MatchConfig.complete),
                    help="calibrate / match --complete N (the photos of the N best verified individuals verified "
                    "too), comma-separated, e.g. '0,5': the first is the run's own, each other one calibrates a copy of the "
                    "same verified network (run label trained+completeN)")
    ap.add_argument("--verifier-queries", default=str(VerifierTrainConfig.max_queries),
                    help="train-verifier --max-queries (training photos used as queries to build its pairs), "
                    "comma-separated, e.g. '600,2000': the first is the run's own; each other one verifies and "
                    "calibrates a copy of the same trained network (run label trained+vq-N)")
    ap.add_argument("--data", type=Path, default=DATA,
                    help="the development set: catalog.csv, metadata.csv (flank side) and the photos (default: %(default)s)")
    ap.add_argument("--protocol", type=Path, default=PROTOCOL,
                    help="the evaluation protocol's folder: split.py and score.py (default: %(default)s)")
    args = ap.parse_args()
    DATA, PROTOCOL = args.data, args.protocol
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    missing = [name for name in ("catalog.csv", "metadata.csv") if not (DATA / name).is_file()]
    if missing:
        sys.exit(f"development set not found at {DATA} (--data: no {' or '.join(missing)}): nothing to measure")
    missing = [name for name in ("split.py", "score.py") if not (PROTOCOL / name).is_file()]
    if missing:
        sys.exit(f"the evaluation protocol's {' and '.join(missing)} not found in {PROTOCOL} (--protocol)")
    set_threads()
    machine = describe()
    print(headline(machine), flush=True)
    # these options are checked before the split is written
    mirrors = on_off("--mirror", args.mirror)
    whitening = on_off("--whitening", args.whitening)
    iweights = on_off("--inlier-weights", args.inlier_weights)
    vweights = on_off("--vote-weights", args.vote_weights)
    try:
        completes = [int(c) for c in args.complete.split(",")]
        if len(set(completes)) < len(completes) or min(completes) < 0:
            raise ValueError
    except ValueError:
        sys.exit(f"--complete {args.complete}: expected distinct counts >= 0 separated by commas, e.g. 0,5")
    try:
        vqueries = [int(c) for c in args.verifier_queries.split(",")]
        if len(set(vqueries)) < len(vqueries) or min(vqueries) < 10:
            raise ValueError
    except ValueError:
        sys.exit(f"--verifier-queries {args.verifier_queries}: expected distinct counts >= 10 separated by commas, "
                 "e.g. 600,2000")
    ewhiten = on_off("--embedding-whitening", args.embedding_whitening)
    view_sets = [tuple(v.strip() for v in entry.split("+")) for entry in args.views.split(",")]
    problem = next((p for p in map(views_problem, view_sets) if p), None)
    if problem:
        sys.exit(f"--views {args.views}: {problem} (views joined by +, sets of views by commas)")
    if len(set(view_sets)) < len(view_sets):
        sys.exit(f"--views {args.views}: each set of views once")
    try:
        weights = [float(w) for w in args.individual_weight.split(",")]
    except ValueError:
        weights = []
    if not weights or any(not 0 <= w <= 1 for w in weights) or len(set(weights)) < len(weights):
        sys.exit(f"--individual-weight {args.individual_weight}: expected distinct shares between 0 and 1, "
                 "comma-separated, e.g. 0.25,0")
    networks = args.network.split(",")
    if any(k not in ("average", "best") for k in networks) or len(set(networks)) < len(networks):
        sys.exit(f"--network {args.network}: expected average, best or 'average,best'")
    if networks[0] == "best" and "average" in networks:
        # averaging() adds no epoch to the mean when average_from is None: its checkpoint holds no average
        sys.exit(f"--network {args.network}: a training that keeps its best epoch keeps no averaged weights; "
                 "give 'average,best' (the averaged training's checkpoint also holds its best epoch)")
    args.work.mkdir(parents=True, exist_ok=True)
    gallery, qdir, qcsv, truth_csv = make_split(args.work, args.seed)
    truth = read_truth(truth_csv)
    size = tuple(int(v) for v in args.input_size.split("x"))
    table, info = {}, {}
    runs = []
    model = ModelConfig(input_size=size, mirror=mirrors[0] == "on", views=view_sets[0])
    if not args.skip_baseline:
        runs.append(("baseline", TrainConfig(model=model, epochs=0, seed=args.seed,
                                             whiten_embedding=ewhiten[0] == "on")))
    label = "trained" if args.freeze_blocks == TrainConfig.freeze_blocks else f"trained_freeze{args.freeze_blocks}"
    runs.append((label,
                 TrainConfig(model=model, epochs=args.epochs,
                             max_minutes=args.train_minutes, seed=args.seed, freeze_blocks=args.freeze_blocks,
                             average_from=TrainConfig.average_from if networks[0] == "average" else None,
                             whiten_embedding=ewhiten[0] == "on")))
    presets = args.keypoints.split(",")
    unknown = [k for k in presets if k not in KEYPOINT_PRESETS]
    if unknown:
        sys.exit(f"--keypoints: unknown preset(s) {', '.join(unknown)}; known: {', '.join(KEYPOINT_PRESETS)}")
    matchers = tuple(args.matchers.split(","))
    entries = args.votes.split(",")
    try:  # (label suffix, MatchConfig) per setting
        if len(set(entries)) < len(entries) or any(v.count(":") > 2 for v in entries):
            raise ValueError
        votes = [(v, dataclasses.replace(vote_setting(v), individual_weight=weights[0],
                                         vote_weights=vweights[0] == "on", complete=completes[0]))
                 for v in entries]
    except ValueError:
        sys.exit(f"--votes {args.votes}: expected distinct VOTES[:V[:K]] entries separated by commas, "
                 "e.g. 0,20,20:20,100:300:200")
    # train-verifier's settings of the run's own verifier (the fifth element of a job)
    verifier = {"whitening": whitening[0] == "on", "inlier_weights": iweights[0] == "on", "max_queries": vqueries[0]}
    trained = runs[-1][0]
    # (label, training or how to get the run, keypoint preset, match settings, train-verifier settings)
    jobs = [(label, cfg, presets[0], votes[0][1], verifier) for label, cfg in runs]
    jobs += [(f"{trained}@{k}", "copy network", k, votes[0][1], verifier) for k in presets[1:]]  # other keypoints
    jobs += [(f"{trained}+votes{vote_label(v)}", "copy verified", presets[0], m, verifier)  # other vote settings
             for v, m in votes[1:]]
    jobs += [(f"{trained}+indiv{w:g}", "copy verified", presets[0],  # other individual weights
              dataclasses.replace(votes[0][1], individual_weight=w), verifier) for w in weights[1:]]
    jobs += [(f"{trained}+vweights-{w}", "copy verified", presets[0],  # votes weighted or not
              dataclasses.replace(votes[0][1], vote_weights=w == "on"), verifier) for w in vweights[1:]]
    jobs += [(f"{trained}+complete{c}", "copy verified", presets[0],  # photos of the best individuals verified too
              dataclasses.replace(votes[0][1], complete=c), verifier) for c in completes[1:]]
    jobs += [(f"{trained}+whiten-{w}", "copy network, shared cache", presets[0], votes[0][1],
              {**verifier, "whitening": w == "on"})
             for w in whitening[1:]]
    jobs += [(f"{trained}+mirror-{m}", "copy verified, mirror " + m, presets[0], votes[0][1], verifier)
             for m in mirrors[1:]]
    jobs += [(f"{trained}+views-{'+'.join(v)}", "copy verified, views " + "+".join(v), presets[0], votes[0][1],
              verifier) for v in view_sets[1:]]
    jobs += [(f"{trained}+network-{k}", "copy network, keep " + k, presets[0], votes[0][1], verifier)
             for k in networks[1:]]
    jobs += [(f"{trained}+ewhiten-{w}", "copy verified, embedding whitening " + w, presets[0], votes[0][1],
              verifier) for w in ewhiten[1:]]
    jobs += [(f"{trained}+iweights-{w}", "copy network, shared cache", presets[0], votes[0][1],
              {**verifier, "inlier_weights": w == "on"}) for w in iweights[1:]]
    jobs += [(f"{trained}+vq-{n}", "copy network, shared cache", presets[0], votes[0][1],
              {**verifier, "max_queries": n}) for n in vqueries[1:]]
    for label, cfg, keypoints, mcfg, vsettings in jobs:
        run = args.work / f"run_{label}"
        t0 = time.perf_counter()
        # --reuse: what a run folder already has (a network, a verifier, a calibration) is kept
        if not (args.reuse and (run / "siamese.pt").is_file() and embeds_as_asked(run, cfg)):
            if isinstance(cfg, TrainConfig):
                train_siamese.main(cfg, train_siamese.Paths(gallery, run, DATA), progress=False, overwrite=True)
            elif cfg == "copy network":
                copy_trained(args.work / f"run_{trained}", run)
            elif cfg == "copy network, shared cache":
                copy_trained(args.work / f"run_{trained}", run, share_cache=True)
            elif cfg == "copy verified":
                copy_verified(args.work / f"run_{trained}", run)
            elif embedding_asked(cfg):  # "copy verified, views V" or "copy verified, mirror on|off"
                copy_verified(args.work / f"run_{trained}", run)
                set_model(run, **embedding_asked(cfg))
            elif whitening_asked(cfg) is not None:  # "copy verified, embedding whitening on|off"
                copy_verified(args.work / f"run_{trained}", run)
                set_embedding_whitening(run, whitening_asked(cfg))
            elif cfg.startswith("copy network, keep"):
                copy_trained(args.work / f"run_{trained}", run, share_cache=True)
                set_network(args.work / f"run_{trained}", run, cfg.rsplit(" ", 1)[1])
        own = ModelConfig.from_dict(RunFolder(run).config()["train"]["model"]) if isinstance(cfg, TrainConfig) else None
        if own is not None and own.mirror != cfg.model.mirror:
            sys.exit(f"{run} embeds {'with' if own.mirror else 'without'} the mirror image (--reuse): give --mirror "
                     f"{'on' if own.mirror else 'off'} first")
        if own is not None and own.views != cfg.model.views:
            sys.exit(f"{run} embeds the views {'+'.join(own.views)} (--reuse): give --views {'+'.join(own.views)} "
                     "first")
        has = RunFolder(run).embedding_whitening_path.is_file()
        if isinstance(cfg, TrainConfig) and has != cfg.whiten_embedding:
            sys.exit(f"{run} searches {'whitened' if has else 'unwhitened'} embeddings (--reuse): give "
                     f"--embedding-whitening {'on' if has else 'off'} first")
        kept = RunFolder(run).config()["train"].get("average_from") if isinstance(cfg, TrainConfig) else False
        if kept is not False and (kept is None) != (cfg.average_from is None):
            sys.exit(f"{run} keeps the {'best epoch' if kept is None else 'averaged weights'} (--reuse): give "
                     f"--network {'best' if kept is None else 'average'} first")
        for output, step in post_training_steps(run, matchers, keypoints, mcfg, **vsettings):
            keep = args.reuse or (isinstance(cfg, str) and cfg.startswith("copy verified")
                                  and output == "verifier.json")
            if keep and output == "verifier.json" and (run / "config.json").is_file():
                # a verifier holds for the keypoint settings it was fitted on (a preset's may change)
                recorded = json.loads((run / "config.json").read_text()).get("keypoints")
                keep = recorded == config_to_dict(KEYPOINT_PRESETS[keypoints])
                # and for the inlier weights it was asked for (a verifier from before them: none)
                metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
                fitted_with = metrics.get("train_verifier", {}).get("config", {})
                keep = keep and bool(fitted_with.get("inlier_weights", False)) == vsettings["inlier_weights"]
                keep = keep and fitted_with.get("max_queries") == vsettings["max_queries"]
            if keep and output == "calibration.json" and (run / output).is_file():
                # a calibration holds for the match settings it was fitted with (one without a record: none)
                calibration = json.loads((run / output).read_text())
                fitted = calibration.get("match")
                # (votes are weighted only where the run has a model of inliers)
                now = match_settings_of(mcfg, votes_available=True, vote_weights_available=bool(
                    (RunFolder(run).config().get("inlier_weights") or {}).get("sift")))
                keep = bool(fitted) and fitted_settings(fitted, now) == now and not votes_rule_stale(fitted)
                # and for the files it was fitted on (one without the record: kept, as match reads it)
                keep = keep and not calibration_changes(RunFolder(run), calibration)
            if not (keep and (run / output).is_file()):
                step()
        info[label] = {"build_seconds": round(time.perf_counter() - t0, 1), "keypoints": keypoints,
                       "votes": mcfg.votes, "individual_weight": mcfg.individual_weight,
                       "vote_weights": mcfg.vote_weights, "verify_top": mcfg.verify_top, "complete": mcfg.complete,
                       "shortlist": mcfg.shortlist, **vsettings}
        rows, timing = evaluate_run(run, qdir, qcsv, truth, args.work, label, options=isinstance(cfg, TrainConfig),
                                    cfg=mcfg)
        table.update(rows)
        info[label].update(timing)
        proto = subprocess.run([sys.executable, str(PROTOCOL / "score.py"), str(truth_csv),
                                timing["predictions"]], capture_output=True, text=True, check=True)
        info[label]["protocol_score"] = json.loads(proto.stdout)
    for label in info:  # one table per run: its stages, then the options
        own = {k[len(label) + 1:]: v for k, v in table.items() if k.startswith(label + ":")}
        print(f"\n{label}:\n" + format_metrics(own))
    for label, d in info.items():
        ips = d["embed_images_per_s"]
        print(f"{label}: engine answer MAP@5 {d['protocol_score']['map5']:.3f} (protocol score.py), "
              f"{d['query_seconds']:.3f} s/query, embedding "
              f"{'(cached)' if ips is None else f'{ips:.1f} img/s'}, built in {d['build_seconds']:.0f} s; "
              "per query: " + ", ".join(f"{k} {v:.3f} s" for k, v in d["stage_seconds_per_query"].items()) +
              f"\n  {format_places(d['right_animal'])}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    report = json.dumps({"machine": machine, "table": table, "runs": info, "args": {
        k: str(v) for k, v in vars(args).items()}}, indent=1)
    # the latest run's, and one beside its runs in --work, which runs in parallel do not overwrite
    for path in (out / "accuracy.json", args.work / "accuracy.json"):
        path.write_text(report)
    print(f"wrote {out / 'accuracy.json'} and {args.work / 'accuracy.json'}")


def vote_setting(entry: str) -> MatchConfig:
    """`--votes` entry VOTES[:V[:K]] as match settings (V: --verify-top, K: --shortlist; defaults:
    MatchConfig's)."""
    parts = [int(x) for x in entry.split(":")]
    keys = ("votes", "verify_top", "shortlist")
    return dataclasses.replace(MatchConfig(), **dict(zip(keys, parts)))


def vote_label(entry: str) -> str:
    """The run label suffix of a `--votes` entry: 20 -> 20, 50:100 -> 50v100, 100:300:200 -> 100v300k200."""
    return "".join(mark + part for mark, part in zip(("", "v", "k"), entry.split(":")))


def copy_trained(src: Path, dst: Path, share_cache: bool = False) -> None:
    """A run folder holding `src`'s trained network and gallery, without its verifiers, whitening or
    calibration; without its cache (keypoints are extracted again with the new folder's preset), or
    sharing it (a link: its caches are fingerprinted by their settings)."""
    if not (src / "siamese.pt").is_file():
        sys.exit(f"{src}: no trained network to copy (run without --reuse first)")
    dst.mkdir(parents=True, exist_ok=True)
    fitted = ("verifier", "calibration", "whitening", "inlier_weights")
    for f in dst.iterdir():  # a previous run's, fitted on what is replaced now
        if f.is_file() and f.name.startswith(fitted):
            f.unlink()
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(fitted):
            shutil.copy2(f, dst / f.name)
    if share_cache and not (dst / "cache").exists():
        (dst / "cache").symlink_to((src / "cache").resolve(), target_is_directory=True)


def copy_verified(src: Path, dst: Path) -> None:
    """A run folder holding `src`'s network, gallery and verifiers, sharing its cache (a link), without
    its calibration."""
    copy_trained(src, dst, share_cache=True)
    for f in list(src.glob("verifier*")) + list(src.glob("whitening*")) + list(src.glob("inlier_weights*")):
        shutil.copy2(f, dst / f.name)


def on_off(option: str, value: str) -> list[str]:
    """An on / off option's settings ("on", "off", "on,off" or "off,on"), or exit saying what is expected."""
    settings = value.split(",")
    if any(v not in ("on", "off") for v in settings) or len(set(settings)) < len(settings):
        sys.exit(f"{option} {value}: expected on, off, 'on,off' or 'off,on'")
    return settings


def embedding_asked(how) -> dict:
    """The ModelConfig settings a job's copy embeds with: {"views": ...} for "copy verified, views V",
    {"mirror": ...} for "copy verified, mirror on|off", {} for any other job."""
    if isinstance(how, str) and how.startswith("copy verified, views"):
        return {"views": tuple(how.rsplit(" ", 1)[1].split("+"))}
    if isinstance(how, str) and how.startswith("copy verified, mirror"):
        return {"mirror": how.endswith(" on")}
    return {}


def whitening_asked(how) -> bool | None:
    """Whether a job's copy searches whitened embeddings: True / False for "copy verified, embedding
    whitening on|off", None for any other job."""
    if isinstance(how, str) and how.startswith("copy verified, embedding whitening"):
        return how.endswith(" on")
    return None


def embeds_as_asked(run: Path, how) -> bool:
    """Whether the run records the embedding settings its job asks for (embedding_asked; the embedding
    whitening, whitening_asked: its file): set_model and set_embedding_whitening write them last, so a
    copy interrupted before is made again."""
    if whitening_asked(how) is not None:
        return RunFolder(run).embedding_whitening_path.is_file() == whitening_asked(how)
    asked = embedding_asked(how)
    if not asked:
        return True
    model = ModelConfig.from_dict(RunFolder(run).config()["train"]["model"])
    return all(getattr(model, k) == v for k, v in asked.items())


def set_model(run: Path, **settings) -> None:
    """The run's network with these ModelConfig settings (mirror, views), its gallery embedded again
    with them (the weights and the embedding centre unchanged), recorded in siamese.pt and config.json."""
    from engine.pipeline import build_gallery
    from siamese.model import save_model

    engine = Engine.load(run)
    engine.model.config = dataclasses.replace(engine.model.config, **settings)
    save_model(engine.model, run / "siamese.pt")
    gallery, _ = build_gallery(engine.run, engine.model, engine.gallery.records(), MatchConfig(), progress=False)
    refit_embedding_whitening(run, gallery)
    train = engine.run.config()["train"]
    engine.run.update_config(train={**train, "model": engine.model.config.to_dict()})


def set_embedding_whitening(run: Path, on: bool, gallery=None) -> None:
    """The run's embedding whitening fitted as train-siamese fits it (on the gallery photos of the
    individuals not held out; `gallery`: the run's, if already loaded), or removed; the network and
    gallery unchanged."""
    from core.gallery import Gallery

    folder = RunFolder(run)
    gallery = gallery if gallery is not None else Gallery.load(folder.gallery_path, folder.images_root())
    w = train_siamese.write_embedding_whitening(folder, gallery, folder.heldout(), on)
    print(f"{run.name}: embedding {'whitened' if w['fitted'] else 'not whitened'} for search", flush=True)


def refit_embedding_whitening(run: Path, gallery) -> None:
    """After the gallery is embedded again (another network or embedding setting; `gallery`, as
    build_gallery returned it): the run's embedding whitening, if it has one, fitted again on the new
    embeddings (as train-siamese would)."""
    if RunFolder(run).embedding_whitening_path.is_file():
        set_embedding_whitening(run, True, gallery)


def set_network(trained: Path, run: Path, keep: str) -> None:
    """The copy `run` of the `trained` run with the other network of the same training (its
    checkpoint's averaged weights or best epoch), its gallery embedded again. The held-out individuals
    that calibrate follow the network (engine.train_siamese.heldout_roles): all of them for averaged
    weights, all but the validation half for the best epoch (which they chose), so the two differ in
    their calibration too (40 individuals and MAP@5's tau, or 20 and the lowest fold tau, on the
    development set)."""
    import torch

    from engine.pipeline import build_gallery
    from siamese.model import save_model

    ck = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=False)
    weights = ck.get("best_state" if keep == "best" else "average")
    if weights is None:
        sys.exit(f"{trained}/checkpoint.pt holds no {'best epoch' if keep == 'best' else 'averaged weights'}")
    train = RunFolder(run).config()["train"]
    average_from = (None if keep == "best" else TrainConfig.average_from if train.get("average_from") is None
                    else train["average_from"])
    # first (a copy killed later is not reused with the other network's roles: it has the run's siamese.pt)
    held = read_json(run / "heldout.json")
    held["validation"], held["calibration"] = heldout_roles(held["individuals"], train["epochs"], average_from)
    atomic_write_json(run / "heldout.json", held)
    engine = Engine.load(run)
    engine.model.load_state_dict(weights)
    save_model(engine.model, run / "siamese.pt")
    gallery, _ = build_gallery(engine.run, engine.model, engine.gallery.records(), MatchConfig(), progress=False)
    refit_embedding_whitening(run, gallery)
    engine.run.update_config(train={**train, "average_from": average_from})


def post_training_steps(run: Path, matchers: tuple[str, ...] = ("sift",), keypoints: str = "default",
                        match: MatchConfig = MatchConfig(), whitening: bool = VerifierTrainConfig.whitening,
                        inlier_weights: bool = VerifierTrainConfig.inlier_weights,
                        max_queries: int = VerifierTrainConfig.max_queries) -> list:
    """After train-siamese, (the file it writes, step): the keypoint verifier, then calibration on the
    held-out individuals (with the `match` settings: --votes, --verify-top, --shortlist)."""
    from engine import calibrate as calibrate_command
    from engine import train_verifier as verifier_command

    def verifier():
        s = verifier_command.main(VerifierTrainConfig(matchers=matchers, keypoints=keypoints, whitening=whitening,
                                                      inlier_weights=inlier_weights, max_queries=max_queries),
                                  verifier_command.Paths(run), progress=False)
        if "whitening" in s:
            w = s["whitening"]
            print(f"{run.name}: sift descriptors {'whitened' if w['fitted'] else 'as extracted'} "
                  f"({w['correspondences']} correct matches in {w['accepted']} of {w['pairs']} pairs)", flush=True)
        for name, m in s["matchers"].items():
            print(f"{run.name}: {name} verifier held-out AUC {m['heldout_auc_validator']:.3f} "
                  f"(raw inlier count {m['heldout_auc_inlier_count']:.3f}), {m['ms_per_pair']:.1f} ms/pair",
                  flush=True)

    def calibrate():
        c = calibrate_command.main(calibrate_command.CalibrateConfig(), calibrate_command.Paths(run),
                                   match, progress=False)
        print(f"{run.name}: calibration " + ", ".join(
            f"{k} {v['map5_mean']:.3f}±{v['map5_std']:.3f}" for k, v in c["summary"].items()), flush=True)

    return [("verifier.json", verifier), ("calibration.json", calibrate)]


if __name__ == "__main__":
    main()
