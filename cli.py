"""Photo-identification of individual animals: match new photos against a labelled gallery.

\b
  python cli.py train-siamese --catalog gallery.csv --out runs/r1
      build (and train) a run folder
  python cli.py match photos/ --run runs/r1 --out predictions.csv
      top-5 IDs or new_individual for each photo
  python cli.py evaluate --catalog labelled.csv --run runs/r1
      MAP@5, top-1, top-5, new-individual precision / recall / F1
  python cli.py demo
      the whole path on a built-in sample
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

if not sys.stderr.isatty():  # a log file: a progress bar line every 30 s, not ten a second (read at
    os.environ.setdefault("TQDM_MININTERVAL", "30")  # tqdm's import, so before anything imports it)

import typer  # noqa: E402

from core.errors import UserError  # noqa: E402
from engine.config import INDIVIDUAL_WEIGHT, DemoConfig, MatchConfig, VerifierTrainConfig  # noqa: E402
from ranker.fusion import FusionConfig  # noqa: E402
from siamese.config import TrainConfig  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
                  pretty_exceptions_enable=False,
                  rich_markup_mode=None)
log = logging.getLogger("cli")


class _TqdmHandler(logging.Handler):
    """Log lines through tqdm.write: a warning during a progress bar gets its own line instead of
    landing inside the bar's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            # the stderr of now, not of when logging was set up: a test harness swaps and closes it
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  as logging.StreamHandler does: never let a log line fail a run
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s",
                        handlers=[_TqdmHandler()], force=True)
    quiet_modules = ("PIL", "h5py", "timm", "matplotlib", "faiss", "faiss.loader", "ranker", "keypoints.validator")
    for noisy in quiet_modules if not verbose else quiet_modules[:5]:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _use_executor(kind: str, address: str | None) -> None:
    from core.executor import ExecutorConfig, use_executor

    use_executor(ExecutorConfig(kind=kind, ray_address=address))


INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it


def user_errors(fn=None, *, on_interrupt: str = ""):
    """A user's mistake ends in one sentence on stderr and exit code 2, never a traceback; Ctrl-C in
    exit code 130 and what the files are, then `on_interrupt` (how the command continues)."""
    if fn is None:  # (used as @user_errors(on_interrupt=...))
        return functools.partial(user_errors, on_interrupt=on_interrupt)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except OSError as e:  # an unwritable output, a full disk, an unreadable run file
            typer.echo(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted: every file written before now is complete (each is written whole, then "
                       "renamed); the interrupted step left no partial file, and the feature caches keep "
                       f"what they had finished.{on_interrupt}", err=True)
            raise typer.Exit(INTERRUPTED)

    return wrapper


CatalogOpt = Annotated[Path, typer.Option("--catalog", help="CSV with columns image,individual_id "
                                          "(optional: viewpoint, bbox x,y,w,h, species).")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Folder the catalog's image paths are "
                                                   "relative to. Default: the catalog's own folder.")]
RunOpt = Annotated[Path, typer.Option("--run", help="Run folder made by train-siamese.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ExecutorOpt = Annotated[str, typer.Option(help="Where embedding, keypoint extraction and verification run: "
                                          "local (this process) or ray (Ray tasks; results are cached here).")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster to use with --executor ray (default: "
                                                      "$RAY_ADDRESS, else a local Ray started on demand).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
TauOpt = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="new_individual threshold, 0-1, on the fused "
                                                 "score (default: the calibrated one; without calibrate, on "
                                                 "the score of the stage that ranks).")]
PrecisionOpt = Annotated[str, typer.Option(help="Network precision: auto (fp32, unless the CPU computes bf16 "
                                           "natively and bf16 measures faster; bf16 or fp16 on a GPU), fp32, "
                                           "bf16, or fp16 (GPU only).")]


_TRAIN = TrainConfig()  # the defaults of train-siamese, defined once (siamese.trainer)
_FUSION = FusionConfig()  # the calibrator calibrate uses by default (ranker.fusion)


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())  # (matcher names are lower-case)
    if not names:
        raise UserError(f"{option} {text!r}: give at least one name")
    return names


VerifyTopOpt = Annotated[int, typer.Option(min=0, help="Gallery photos per query checked by the local "
                                           "matchers (if the run has them): the pair head's best in turn with "
                                           "the photos of most keypoint votes.")]
ShortlistOpt = Annotated[int, typer.Option(min=1, help="Gallery photos proposed per query by the embedding.")]
PerIndividualOpt = Annotated[int, typer.Option(min=0, help="At most N photos of one individual in a shortlist, "
                                               "its most similar ones, so that it reaches more individuals "
                                               "(0: no cap).")]
VotesOpt = Annotated[int, typer.Option(min=0, help="Gallery photos proposed per query by keypoint votes "
                                       "(the gallery's SIFT descriptors in one index, each query descriptor "
                                       "voting for the photos of its nearest ones), added to the embedding's "
                                       "shortlist; they take every other one of the --verify-top checks by the "
                                       "local matchers. The votes are also a score of their own (0: off).")]
CompleteOpt = Annotated[int, typer.Option(min=0, help="After the --verify-top checks, the photos (of the query's "
                                          "viewpoint) of the N individuals whose checked photos scored best "
                                          "are checked too, up to 10 per individual (those nearest the query): "
                                          "the shortlist holds one or two photos of most candidates, often not "
                                          "the one taken closest to the query's angle (0: off). A setting "
                                          "calibrate records.")]
IndividualWeightOpt = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, help="Share of the embedding's score that is the query's cosine to the mean of the "
                           "candidate individual's photos of that viewpoint, the rest its cosine to the photo "
                           f"(0: the photo alone). Default: calibrate fits {INDIVIDUAL_WEIGHT:g}; match and "
                           "evaluate use the calibration's.")]
VoteWeightsOpt = Annotated[Optional[bool], typer.Option(
    "--vote-weights/--no-vote-weights", help="Weigh each keypoint vote by the verifier's model of which "
    "inliers tell individuals apart (train-verifier --inlier-weights), so that heads, legs and background "
    "vote less than the coat pattern. Default: calibrate fits with it where the run has the model; match and "
    "evaluate use the calibration's (plain votes for a calibration made before the option or with --votes 0; "
    "weighted without a calibration).", show_default=False)]
QueryExpansionOpt = Annotated[int, typer.Option(min=0, help="Search again with each query averaged with its "
                                                "best N gallery photos (query expansion; 0: off).")]
RerankOpt = Annotated[int, typer.Option(min=0, help="k-reciprocal re-ranking of each shortlist with K "
                                         "neighbours (e.g. 20; 0: off): gallery photos that are among each "
                                         "other's nearest neighbours move up.")]
MatchersOpt = Annotated[Optional[str], typer.Option(help="Local matchers to use, comma-separated, among those "
                                                   "the run has a verifier for: sift, xfeat (default: all "
                                                   "of them).")]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--input-size {text!r} is not HEIGHTxWIDTH, e.g. 224x224") from None
    if not (32 <= h <= 2048 and 32 <= w <= 2048):
        raise UserError(f"--input-size {text!r}: each side must be 32 to 2048 pixels")
    return h, w


def _parse_views(text: str) -> tuple[str, ...]:
    from siamese.config import views_problem

    views = tuple(v.strip().lower() for v in text.split(","))
    problem = views_problem(views)
    if problem:
        raise UserError(f"--views {text!r}: {problem}")
    return views


@app.command("train-siamese")
@user_errors(on_interrupt=" `train-siamese` with the same options and --resume continues the training from its "
                          "last finished epoch.")
def train_siamese_cmd(
    catalog: CatalogOpt,
    out: Annotated[Path, typer.Option("--out", help="Run folder to create (or resume).")],
    images: ImagesOpt = None,
    backbone: Annotated[str, typer.Option(help="timm backbone name.")] = _TRAIN.model.backbone,
    weights: Annotated[Optional[Path], typer.Option(help="Local backbone weights file (default: the bundled "
                                                    "ImageNet mobilenetv2_100).")] = None,
    input_size: Annotated[str, typer.Option(help="Network input HEIGHTxWIDTH in pixels.")] = "224x224",
    crop: Annotated[str, typer.Option(help="What the network sees of a photo without a bbox in the catalog: "
                                      "focus (the box around the animal, found by the ImageNet network's "
                                      "response) or none (the whole photo).")] = _TRAIN.model.crop,
    mirror: Annotated[bool, typer.Option(help="Embed each photo as the mean of its features and its mirror "
                                         "image's (twice the network's work per photo; more often the right "
                                         "animal among the nearest photos, see docs/measured.md).")] =
    _TRAIN.model.mirror,
    views: Annotated[str, typer.Option(help="What of each photo is embedded, comma-separated, the features "
                                       "averaged: box (what --crop gives), centre (the middle 80% of the box), "
                                       "photo (the whole photo, or its catalog bbox; with --crop none or a bbox "
                                       "it is the box and counts once). Each view costs one more pass of the "
                                       "network per photo (see 'Three views' in docs/measured.md).")] =
    ",".join(_TRAIN.model.views),
    epochs: Annotated[int, typer.Option(min=0, help="Training epochs (the time budget usually stops first); "
                                        "0 = the pretrained network, retrieval only.")] = _TRAIN.epochs,
    max_minutes: Annotated[Optional[float], typer.Option(
        min=0.0, help="Stop training after this many minutes; the learning rate and LAP noise follow the clock then. "
             "0 = no time budget: the schedule follows epochs only, so two runs give the same bits.")
    ] = _TRAIN.max_minutes,
    seed: Annotated[int, typer.Option(help="Seed for splits, mining and initialisation.")] = _TRAIN.seed,
    heldout_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of individuals (with 2+ "
                                                    "photos) kept out of training, for validation and "
                                                    "calibrate.")] = _TRAIN.heldout_fraction,
    batch_size: Annotated[int, typer.Option(min=2, help="Images per training/embedding batch.")] =
    _TRAIN.batch_size,
    freeze_blocks: Annotated[int, typer.Option(min=0, help="Keep the backbone's stem and first N stages as "
                                               "pretrained (faster epochs; 0: train every layer).")] =
    _TRAIN.freeze_blocks,
    average_from: Annotated[float, typer.Option(min=0.0, max=1.0, help="The network kept is the mean of the "
                                                "weights at the ends of the epochs from this share of the "
                                                "training on (stochastic weight averaging; 1: the last epoch's).")
                            ] = _TRAIN.average_from,
    whiten_embedding: Annotated[bool, typer.Option(
        help="After training, learn a whitening of the embedding from the gallery photos of the individuals "
             "trained on (the directions in which one animal's photos differ are shrunk) and search the "
             "whitened embeddings for the shortlist (see 'Embedding whitening' in docs/measured.md).")] = _TRAIN.whiten_embedding,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's last checkpoint, with the same "
                                         "settings (only --epochs and --max-minutes may change, and how photos "
                                         "are embedded and searched: --views, --mirror, --whiten-embedding).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the trained run already in --out (its network, "
                                            "gallery, verifier and calibration; photos enrolled since are "
                                            "dropped unless they are in --catalog), or start an interrupted "
                                            "training over.")] = False,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    precision: PrecisionOpt = "auto",
    executor: ExecutorOpt = "local", ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
):
    """Build a run folder from a labelled catalog: the network, the gallery embeddings, the settings."""
    _setup_logging(verbose)
    _use_executor(executor, ray_address)
    from siamese.model import ModelConfig
    from engine import train_siamese

    cfg = TrainConfig(model=ModelConfig(backbone=backbone, weights=str(weights) if weights else None,
                                        input_size=_parse_size(input_size), crop=crop,
                                        mirror=mirror, views=_parse_views(views)),
                      epochs=epochs, max_minutes=max_minutes, seed=seed, batch_size=batch_size, threads=threads,
                      heldout_fraction=heldout_fraction, precision=precision, freeze_blocks=freeze_blocks,
                      average_from=average_from, whiten_embedding=whiten_embedding)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    s = train_siamese.main(cfg, train_siamese.Paths(catalog, out, images), resume=resume, progress=not quiet,
                           overwrite=overwrite)
    skipped = f", {len(s['skipped'])} unreadable photo(s) skipped" if s["skipped"] else ""
    white = ", embedding whitened for search" if s["embedding_whitening"]["fitted"] else ""
    typer.echo(f"run {out}: {s['epochs_trained']} epoch(s) trained, gallery {s['gallery_photos']} photos of "
               f"{s['gallery_individuals']} individuals{skipped}{white}, {s['seconds']:.0f} s")


@app.command("train-verifier")
@user_errors
def train_verifier_cmd(
    run: RunOpt,
    keypoints: Annotated[str, typer.Option(help="SIFT keypoint preset: default (the 3000 strongest in focus, "
                                           "described upright: for photos taken the right way up), "
                                           "rotation-invariant (the same, described along each keypoint's "
                                           "orientation: photos at any angle), kp1500 (1500, rotation-invariant: "
                                           "~0.6x the matching cost), fast (700 on a 384-pixel image: ~13x "
                                           "cheaper) or dense (3000 from a 768-pixel image).")] =
    "default",
    focus: Annotated[Optional[float], typer.Option(
        min=0.05, max=1.0, help="Share of each photo where SIFT keypoints are kept: where an ImageNet network "
        "sees the animal, not the grass or trees around it (1 = the whole photo; default: 0.5).")] = None,
    matchers: Annotated[str, typer.Option(help="Local matchers to fit a validator for, comma-separated: sift "
                                          "(SIFT/RootSIFT), xfeat (XFeat + LighterGlue).")] =
    ",".join(VerifierTrainConfig.matchers),
    max_queries: Annotated[int, typer.Option(
        min=10, help="Training photos used as queries to build pairs (each gives up to 2 true and "
        f"{VerifierTrainConfig.negatives_per_query} hard false pairs): all of them, up to this many.")] = \
        VerifierTrainConfig.max_queries,
    whitening: Annotated[bool, typer.Option(
        "--whitening/--no-whitening", help="Learn a whitening of the SIFT descriptors from the correct matches "
        "between photos of the same training individual and flank, and match the whitened descriptors "
        "(skipped, with a warning, when the catalog gives too few).")] = VerifierTrainConfig.whitening,
    inlier_weights: Annotated[bool, typer.Option(
        "--inlier-weights/--no-inlier-weights", help="Learn which inliers tell individuals apart (the coat "
        "pattern) and which any two animals of the species or one place share (heads, horns, background), "
        "from the descriptors and positions of the training pairs' inliers; the validator then reads the mean "
        "and sum of that weight over a pair's inliers beside the geometry (skipped, with a warning, when the "
        "training pairs give too few).")] = VerifierTrainConfig.inlier_weights,
    seed: Annotated[int, typer.Option(help="Seed for sampling and the validator.")] = 0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    precision: PrecisionOpt = "auto",
    executor: ExecutorOpt = "local", ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
):
    """Fit the keypoint verifier: SIFT/RootSIFT matches, double homography, XGBoost on the geometry
    and on learned weights of the inliers (which of them tell individuals apart).

    True pairs and hard false pairs (from the retrieval shortlist) come from the run's training
    photos; prints the held-out AUC (folds by individual) beside the raw inlier count's.
    """
    _setup_logging(verbose)
    _use_executor(executor, ray_address)
    from keypoints.features import PRESETS
    from engine import train_verifier

    if keypoints not in PRESETS:
        raise UserError(f"--keypoints {keypoints!r}: choose one of {', '.join(PRESETS)}")
    cfg = VerifierTrainConfig(keypoints=keypoints, verify=keypoints if keypoints == "fast" else "default",
                              max_queries=max_queries, seed=seed, matchers=_names(matchers, "--matchers"),
                              focus=focus, whitening=whitening, inlier_weights=inlier_weights)
    s = train_verifier.main(cfg, train_verifier.Paths(run), threads, progress=not quiet, precision=precision)
    for name, m in s["matchers"].items():
        counts = (f"on the inlier count alone; the whole geometry {m['heldout_auc_whole_geometry']:.3f}, "
                  if m["validator_uses"] == "inliers" else "")
        typer.echo(f"{name} verifier {m['validator']}: {s['pairs']} pairs ({s['positives']} true), held-out AUC "
                   f"{m['heldout_auc_validator']:.3f} ({counts}raw inlier count {m['heldout_auc_inlier_count']:.3f}), "
                   f"{m['ms_per_pair']:.1f} ms/pair")
    for name, iw in s.get("inlier_weights", {}).items():
        typer.echo(f"{name} inlier weights: " + (
            f"fitted on {iw['inliers']} inliers of {iw['pairs_with_inliers_true']} true and "
            f"{iw['pairs_with_inliers_false']} false pairs" if iw["fitted"] else f"none ({iw['reason']})"))
    w = s.get("whitening")
    if w:
        typer.echo(f"sift descriptors {'whitened' if w['fitted'] else 'as extracted'}: {w['correspondences']} correct "
                   f"matches in {w['accepted']} of {w['pairs']} same-flank training pairs")
    typer.echo(f"trained {len(s['matchers'])} verifier(s) in {s['seconds']:.0f} s")


@app.command()
@user_errors
def calibrate(
    run: RunOpt,
    folds: Annotated[int, typer.Option(min=2, help="Open-set folds over the held-out individuals.")] = 3,
    calibrator: Annotated[str, typer.Option(help="Score calibrator per stage: logistic (monotone, keeps each "
                                                 "stage's ranking) or isotonic (steps; for large held-out "
                                                 "sets).")] = _FUSION.calibrator,
    new_rate: Annotated[Optional[float], typer.Option(help="Choose the threshold so that about this share "
                                                      "of queries is answered new_individual, between 0 and 1 "
                                                      "exclusive, e.g. 0.3 (default: maximise MAP@5).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the folds.")] = 0,
    queries_per_individual: Annotated[Optional[int], typer.Option(
        min=1, help="Photos of each held-out individual used as queries per fold (default: every photo, "
                    "each against the rest of the gallery).")] = None,
    shortlist: ShortlistOpt = MatchConfig.shortlist,
    verify_top: VerifyTopOpt = MatchConfig.verify_top,
    per_individual: PerIndividualOpt = MatchConfig.per_individual,
    votes: VotesOpt = MatchConfig.votes,
    complete: CompleteOpt = MatchConfig.complete,
    individual_weight: IndividualWeightOpt = None,
    vote_weights: VoteWeightsOpt = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    precision: PrecisionOpt = "auto",
    executor: ExecutorOpt = "local", ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
):
    """Calibrate each stage's score, fit their fusion and the new_individual threshold.

    Uses the individuals held out of training, in open-set folds (each fold's individuals are new
    animals: their photos leave the gallery and are queries; every photo of the others is a query
    against the rest of the gallery); prints per-fold MAP@5 and its spread (a little optimistic: a fold's
    known animals are queries of the other folds too), then refits on all folds
    (calibration.json). Calibrate with the --shortlist, --verify-top, --per-individual, --votes,
    --complete, --individual-weight and --vote-weights that match will use (match warns when they differ), and again after changing them.
    """
    _setup_logging(verbose)
    _use_executor(executor, ray_address)
    from engine import calibrate as command

    if calibrator not in ("isotonic", "logistic"):
        raise UserError(f"--calibrator {calibrator!r}: choose isotonic or logistic")
    if new_rate is not None and not 0 < new_rate < 1:
        raise UserError(f"--new-rate {new_rate}: give a share between 0 and 1 exclusive, e.g. 0.3")
    c = command.main(command.CalibrateConfig(folds=folds, calibrator=calibrator, target_new_rate=new_rate,
                                             seed=seed, queries_per_individual=queries_per_individual),
                     command.Paths(run),
                     MatchConfig(shortlist=shortlist, verify_top=verify_top, per_individual=per_individual,
                                 votes=votes, complete=complete, individual_weight=individual_weight,
                                 vote_weights=vote_weights),
                     threads, progress=not quiet,
                     precision=precision)
    lines = ["score".ljust(12) + "MAP@5 (mean ± sd over folds)".rjust(30) + "new F1".rjust(10) + "tau".rjust(10)]
    for name, s in c["summary"].items():
        lines.append(name.ljust(12) + f"{s['map5_mean']:.3f} ± {s['map5_std']:.3f}".rjust(30)
                     + f"{s['new_f1_mean']:.3f}".rjust(10) + f"{c['tau'][name]:.3f}".rjust(10))
    typer.echo("\n".join(lines))
    typer.echo(f"calibrated on {c['queries']} queries of {c['individuals']} held-out individuals "
               f"({c['new_queries']} new) in {len(c['per_fold'])} "
               f"folds, fused tau {c['tau']['fused']:.3f} ({command.TAU_RULES[c['tau_rule']]}; over folds: "
               f"{', '.join(f'{t:.3f}' for t in c['tau_folds']['values'])}) -> {run / 'calibration.json'} "
               f"({c['seconds']:.0f} s)")


@app.command()
@user_errors
def match(
    test_dir: Annotated[Path, typer.Argument(metavar="TEST_DIR", help="Folder of new photos (searched "
                                             "recursively, through linked folders; hidden files and folders "
                                             "are skipped).")],
    run: RunOpt,
    out: Annotated[Path, typer.Option("--out", help="Predictions CSV to write (image,predictions); a JSON "
                                      "with the same stem gets the per-candidate evidence.")],
    queries: Annotated[Optional[Path], typer.Option(help="CSV image[,viewpoint][,bbox] (paths relative to "
                                                    "TEST_DIR): match only the photos it lists; a viewpoint "
                                                    "compares a photo only with gallery photos of its "
                                                    "viewpoint; a bbox x,y,w,h crops it first.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write a self-contained HTML review page: each "
                                                   "photo beside its top-5 with scores and keypoint "
                                                   "matches, least certain first.")] = None,
    shortlist: ShortlistOpt = MatchConfig.shortlist,
    verify_top: VerifyTopOpt = MatchConfig.verify_top,
    per_individual: PerIndividualOpt = MatchConfig.per_individual,
    votes: VotesOpt = MatchConfig.votes,
    complete: CompleteOpt = MatchConfig.complete,
    individual_weight: IndividualWeightOpt = None,
    vote_weights: VoteWeightsOpt = None,
    tau: TauOpt = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    precision: PrecisionOpt = "auto",
    executor: ExecutorOpt = "local", ray_address: RayAddressOpt = None,
    matchers: MatchersOpt = None,
    query_expansion: QueryExpansionOpt = MatchConfig.query_expansion,
    rerank: RerankOpt = MatchConfig.rerank,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
):
    """Rank the known individuals for every photo in TEST_DIR and write the top-5 of each."""
    _setup_logging(verbose)
    _use_executor(executor, ray_address)
    from engine import match as command

    cfg = MatchConfig(shortlist=shortlist, verify_top=verify_top, per_individual=per_individual, votes=votes,
                      complete=complete, individual_weight=individual_weight, vote_weights=vote_weights, tau=tau,
                      query_expansion=query_expansion, rerank=rerank,
                      matchers=_names(matchers, "--matchers") if matchers is not None else None)
    typer.echo(command.main(cfg, command.Paths(test_dir, run, out, queries, report), threads, progress=not quiet,
                            precision=precision))


@app.command()
@user_errors
def evaluate(
    catalog: CatalogOpt, run: RunOpt, images: ImagesOpt = None,
    shortlist: ShortlistOpt = MatchConfig.shortlist,
    verify_top: VerifyTopOpt = MatchConfig.verify_top,
    per_individual: PerIndividualOpt = MatchConfig.per_individual,
    votes: VotesOpt = MatchConfig.votes,
    complete: CompleteOpt = MatchConfig.complete,
    individual_weight: IndividualWeightOpt = None,
    vote_weights: VoteWeightsOpt = None,
    tau: TauOpt = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    precision: PrecisionOpt = "auto",
    executor: ExecutorOpt = "local", ray_address: RayAddressOpt = None,
    matchers: MatchersOpt = None,
    query_expansion: QueryExpansionOpt = MatchConfig.query_expansion,
    rerank: RerankOpt = MatchConfig.rerank,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
):
    """Score the engine on labelled queries: MAP@5, top-1, top-5, new-individual precision/recall/F1.

    A query whose individual is not in the run's gallery counts as `new_individual`. A query photo
    that is itself in the gallery is never matched with itself.
    """
    _setup_logging(verbose)
    _use_executor(executor, ray_address)
    from engine import evaluate as command

    cfg = MatchConfig(shortlist=shortlist, verify_top=verify_top, per_individual=per_individual, votes=votes,
                      complete=complete, individual_weight=individual_weight, vote_weights=vote_weights, tau=tau,
                      query_expansion=query_expansion, rerank=rerank,
                      matchers=_names(matchers, "--matchers") if matchers is not None else None)
    typer.echo(command.main(cfg, command.Paths(catalog, run, images), threads, progress=not quiet,
                            precision=precision))


@app.command()
@user_errors
def enroll(
    run: RunOpt,
    catalog: Annotated[Optional[Path], typer.Option("--catalog", help="Confirmed photos: CSV image,individual_id "
                                                    "(optional: viewpoint, bbox).")] = None,
    decisions: Annotated[Optional[Path], typer.Option(help="Or the review page's export: CSV image,decision,"
                                                      "individual_id (optional: note, viewpoint, bbox); "
                                                      "'match' and 'new' rows are enrolled, 'unsure' ones "
                                                      "left out.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder the image paths are relative to. "
                                                   "Default: the CSV's own folder (the review page writes "
                                                   "absolute paths).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    precision: PrecisionOpt = "auto",
    executor: ExecutorOpt = "local", ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
):
    """Add newly confirmed photos (and new individuals) to the run's gallery, without retraining.

    Give either --catalog or --decisions. Their embeddings (and keypoints, if the run has a verifier)
    are computed and the index updated; the next `match` sees them. Photos already in the gallery are
    left as they are. The rows added are appended to RUN/enrolled.csv (image,individual_id,viewpoint,bbox),
    ready to append to your catalog.
    """
    _setup_logging(verbose)
    _use_executor(executor, ray_address)
    from engine import enroll as command

    typer.echo(command.main(MatchConfig(), command.Paths(catalog, run, images, decisions), threads,
                            progress=not quiet, precision=precision))


@app.command()
@user_errors
def demo(
    catalog: Annotated[Optional[Path], typer.Option(help="Run on your own labelled photos instead of the "
                                                    "built-in synthetic sample: a fifth of the individuals are kept "
                                                    "aside as new animals, a photo of each other one is a query; "
                                                    "12 or more individuals with 3 or more photos each.")] = None,
    images: ImagesOpt = None,
    out: Annotated[Path, typer.Option(help="Folder for the sample, the run and the outputs.")] = Path("demo_output"),
    seed: Annotated[int, typer.Option(help="Seed of the sample and the split.")] = 0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
):
    """Run the whole path on a sample: split it open-set, build a run, match held-out photos, score."""
    _setup_logging(verbose)
    from engine import demo as command

    typer.echo(command.main(DemoConfig(seed=seed), command.Paths(out, catalog, images), threads,
                            progress=not quiet, precision=precision))


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if e.code == INTERRUPTED:
            # Ctrl-C: leave without the interpreter's teardown. Every file is complete by now, but worker
            # threads of OpenCV, torch or faiss may still be inside native code, and tearing the process
            # down under them can abort it ("terminate called without an active exception", exit 134).
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # (a closed pipe: nothing more to say)
                    stream.flush()
            ray = sys.modules.get("ray")  # a Ray job is ended, not left to the cluster's timeouts
            if ray is not None and ray.is_initialized():
                with contextlib.suppress(Exception):
                    ray.shutdown()
            os._exit(INTERRUPTED)
        raise


if __name__ == "__main__":
    main()
