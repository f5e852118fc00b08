"""The Siamese training loop: BCE on the pairs of batches built from LAP-mined hard negatives.

Every epoch:
1. negatives: one hard, distinct negative per image from the LAP miner on the score matrix (cosine
   similarity of the embeddings of the previous epoch's forward passes, refreshed every
   `refresh_every` epochs), with the noise scale K going from `noise_start` (near-random negatives
   while the network is untrained) to `noise_end` (hardest);
2. batches are built so that each image is embedded ONCE per epoch and its pairs are formed from
   embeddings in the same batch: whole individuals go into a batch (so all its positives are there,
   every in-batch pair of one individual and viewpoint is a positive), and
   batches are grown along the mined negative edges (so the individuals an image is most easily
   confused with are there too);
3. the loss is BCE over every pair of the batch: positives (same individual and viewpoint) carry
   half of it, negatives the other half, of which `mined_weight` goes to the mined negative pairs.
   It is applied to the pair head's logit and to a learned affine map of the embeddings' cosine,
   so the embedding itself (which proposes the faiss shortlist) learns too.
   Why every pair and not only each image's mined pair: on the nyala development set (held-out
   validation MAP@5 over 14 minutes, one core), the mined pair alone drove the network BELOW the
   pretrained one (0.31 -> 0.26-0.29); every pair of the LAP-built batch lifted it to 0.34-0.37
   (0.47 at TrainConfig's learning rates).
The backbone is fine-tuned with a lower learning rate than the head. Checkpoints at epoch ends; the
network kept is the mean of the weights at the ends of the last quarter of the epochs
(`average_from`: stochastic weight averaging), or with `average_from=None` the epoch with the best
held-out validation MAP@5, the untrained network included. On the development set the validation
(20 individuals) could not tell epochs apart, and the average put the right animal first more often
than either the best or the last epoch (docs/measured.md).
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.catalog import Catalog, Record
from core.errors import ImageError, UserError
from core.images import load_image
from core.metrics import average_precision_at_5
from core.runfolder import RunFolder, atomic_path
from core.aggregate import aggregate_per_individual
from siamese.embed import embed_records, normalize_features
from siamese.lap_miner import LapMiner, MinerConfig, noise_at
from siamese.config import PRESETS, TrainConfig  # noqa: F401  re-exported
from siamese.model import SiameseNet, decode_side, preprocess

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data
def _load_resized(rec: Record, size: tuple[int, int]) -> np.ndarray | None:
    """Decode once, keep at a little more than the input size: augmentation crops from it. The
    whole photo (or the catalog's bbox), not the focus box of `ModelConfig.crop`: trained on the
    boxes, the engine's closed-set top-1 fell from 0.292 / 0.285 to 0.264 / 0.236 (seeds 0 / 1),
    while the same whole-photo networks embedding the boxes gave 0.306 / 0.299."""
    h, w = size
    try:
        rgb = load_image(rec.path, rec.bbox, min_side=decode_side(size))
    except ImageError as e:
        log.warning("skipped %s%s", e, rec.line_note)
        return None
    return cv2.resize(rgb, (int(w * 1.15), int(h * 1.15)), interpolation=cv2.INTER_AREA)


def augment(rgb: np.ndarray, cfg, rng: np.random.Generator) -> np.ndarray:
    """Mild: crop 75-100% of the area, aspect +-10%, rotation +-8 degrees, light and contrast
    +-20%. No horizontal flip unless asked: a mirrored flank is another pattern."""
    mc = cfg.model
    h, w = mc.input_size
    H, W = rgb.shape[:2]
    area = rng.uniform(0.75, 1.0)
    aspect = math.exp(rng.uniform(-0.1, 0.1))
    cw, ch = W * math.sqrt(area * aspect), H * math.sqrt(area / aspect)
    cx = rng.uniform(cw / 2, max(cw / 2, W - cw / 2))
    cy = rng.uniform(ch / 2, max(ch / 2, H - ch / 2))
    angle = rng.uniform(-8, 8)
    flip = cfg.hflip and rng.random() < 0.5
    # affine map from source to output: centre the crop, rotate, scale to the output size
    m = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    m[:, 2] += (w / 2 * cw / w - cx, h / 2 * ch / h - cy)
    s = np.diag([w / cw, h / ch])
    m = s @ m
    if flip:
        m = np.array([[-1, 0, w], [0, 1, 0]], np.float64) @ np.vstack([m, [0, 0, 1]])
    out = cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    out = out.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.8, 1.2) + mean
    out = np.clip(out, 0, 255).astype(np.uint8)
    return preprocess(out, mc)


# ---------------------------------------------------------------- batches
def build_batches(labels: np.ndarray, neg_a: np.ndarray, neg_b: np.ndarray, batch_size: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Partition images into batches of at most batch_size: whole individuals (split only when one
    has more photos than a batch holds), grown along mined negative edges so most mined pairs are
    inside a batch. Each image is in exactly one batch."""
    groups: dict = defaultdict(list)
    for i, lab in enumerate(labels):
        groups[lab].append(i)
    units = []
    for members in groups.values():
        members = list(rng.permutation(members))
        units += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    unit_of = np.empty(len(labels), np.int64)
    for u, members in enumerate(units):
        unit_of[members] = u
    parent = list(range(len(units)))
    size = [len(m) for m in units]

    def find(u):
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for e in rng.permutation(len(neg_a)):
        ra, rb = find(unit_of[neg_a[e]]), find(unit_of[neg_b[e]])
        if ra != rb and size[ra] + size[rb] <= batch_size:
            parent[rb] = ra
            size[ra] += size[rb]
    comps: dict = defaultdict(list)
    for u in range(len(units)):
        comps[find(u)] += units[u]
    # first-fit packing of the leftover small components
    batches: list[list[int]] = []
    for comp in sorted(comps.values(), key=len, reverse=True):
        for b in batches:
            if len(b) + len(comp) <= batch_size:
                b += comp
                break
        else:
            batches.append(list(comp))
    order = rng.permutation(len(batches))
    return [np.array(batches[k], np.int64) for k in order if len(batches[k]) >= 2]


def batch_pair_weights(groups: np.ndarray, labels: np.ndarray, mined: np.ndarray, mined_weight: float, device):
    """Every pair of the batch: positives (same individual and viewpoint) and negatives (other
    individuals). Positives carry half the loss, negatives the other half, of which `mined_weight`
    goes to the LAP-mined negatives (`mined[k]`: local index of k's mined negative, -1 if elsewhere)."""
    i, j = np.triu_indices(len(labels), 1)
    pos = groups[i] == groups[j]
    neg = labels[i] != labels[j]
    keep = pos | neg
    i, j, pos = i[keep], j[keep], pos[keep]
    is_mined = ~pos & ((mined[i] == j) | (mined[j] == i))
    n_pos, n_mined, n_other = int(pos.sum()), int(is_mined.sum()), int((~pos & ~is_mined).sum())
    mw = mined_weight if n_mined else 0.0
    w = np.where(pos, 0.5 / max(1, n_pos),
                 np.where(is_mined, 0.5 * mw / max(1, n_mined), 0.5 * (1 - mw) / max(1, n_other)))
    return (torch.from_numpy(i).to(device), torch.from_numpy(j).to(device),
            torch.from_numpy(w.astype(np.float32)).to(device), torch.from_numpy(pos.astype(np.float32)).to(device))


class SubCenterArcFace(torch.nn.Module):
    """Sub-center ArcFace (Deng et al. 2020; the Happywhale winners' loss): K normalised centres per
    training individual; a photo's cosine to an individual is its best centre's, the true
    individual's angle gets an additive margin, and cross-entropy runs over scale * cosines. Only
    for training: the embedding it shapes is what the engine keeps."""

    def __init__(self, dim: int, n_classes: int, subcenters: int, margin: float, scale: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.n_classes, self.k, self.margin, self.scale = n_classes, subcenters, margin, scale
        self.weight = torch.nn.Parameter(torch.randn(n_classes * subcenters, dim, generator=generator) * 0.01)

    def forward(self, e: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cos = (e @ F.normalize(self.weight, dim=1).T).view(len(e), self.n_classes, self.k).amax(-1)
        cos = cos.clamp(-1 + 1e-6, 1 - 1e-6)
        true = cos.gather(1, target[:, None])
        with_margin = torch.cos(torch.acos(true) + self.margin)
        logits = cos.scatter(1, target[:, None], with_margin) * self.scale
        return F.cross_entropy(logits, target)


def batch_mined_negatives(e: torch.Tensor, labels: np.ndarray, miner: LapMiner, noise: float,
                          rng: np.random.Generator) -> np.ndarray:
    """In-batch LAP: each photo's hard negative assigned on the batch's own cosine matrix of this
    forward pass (local index, -1 where none)."""
    sims = (e @ e.T).detach().float().cpu().numpy()
    na, nb = miner.mine_negatives(sims, labels, noise, rng)
    mined = np.full(len(labels), -1, np.int64)
    mined[na] = nb
    return mined


# ---------------------------------------------------------------- validation
def validation_map5(model: SiameseNet, records: list[Record], batch_size: int, rerank: int = 20,
                    set_center: bool = False) -> dict:
    """Leave-one-out MAP@5 among held-out individuals (never trained on): by embedding cosine,
    and with the top `rerank` gallery photos re-scored by the pair head. With set_center, the
    model's centre is first set to the mean of these photos' features (before training)."""
    if len(records) < 3:
        return {}
    # the box alone, whatever ModelConfig.views says: validation costs one view per photo and epoch
    config, model.config = model.config, replace(model.config, views=("box",))
    try:
        emb = embed_records(model, records, None, batch_size, progress=False)
    finally:
        model.config = config
    if set_center and len(emb.ok):
        model.center.copy_(torch.from_numpy(emb.features.mean(0)).to(model.center.device))
        emb.embeddings = normalize_features(model, emb.features)
    recs = [records[i] for i in emb.ok]
    ids = [r.individual_id for r in recs]
    views = np.array([r.viewpoint or "" for r in recs])
    e = emb.embeddings
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    same_view = (views[:, None] == views[None, :]) | (views[:, None] == "") | (views[None, :] == "")
    sims[~same_view] = -np.inf
    device = next(model.parameters()).device
    ap_emb, ap_head = [], []
    counts = defaultdict(int)
    for i in ids:
        counts[i] += 1
    et = torch.from_numpy(e).to(device)
    for q in range(len(recs)):
        if counts[ids[q]] < 2:
            continue
        order = np.argsort(-sims[q])
        order = order[np.isfinite(sims[q][order])]
        ranked = aggregate_per_individual([ids[g] for g in order], sims[q][order])
        ap_emb.append(average_precision_at_5(ids[q], [r[0] for r in ranked]))
        top = order[:rerank]
        with torch.no_grad():
            logit = model.pair_logit(et[q].expand(len(top), -1), et[top]).float().cpu().numpy()
        ranked = aggregate_per_individual([ids[g] for g in top], logit)
        ap_head.append(average_precision_at_5(ids[q], [r[0] for r in ranked]))
    if not ap_emb:
        return {}
    return {"val_map5_embedding": float(np.mean(ap_emb)), "val_map5_head": float(np.mean(ap_head)),
            "val_queries": len(ap_emb)}


# ---------------------------------------------------------------- training
def train_mode(model: SiameseNet) -> None:
    """Train mode with BatchNorm frozen: batches hold a few look-alike individuals, so their
    statistics are far from the population's; the pretrained running statistics stay in use."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def freeze_early_layers(model: SiameseNet, blocks: int) -> int:
    """The backbone's stem and first `blocks` stages fixed at their pretrained weights (no gradient,
    so autograd records nothing below them). Returns how many parameters were frozen."""
    if blocks <= 0:
        return 0
    bb = model.backbone
    stages = getattr(bb, "blocks", None) or getattr(bb, "stages", None)  # timm: EfficientNet/MobileNet, ConvNeXt
    if stages is None or blocks > len(stages):
        have = "no stages it names" if stages is None else f"{len(stages)} stages"
        raise UserError(f"--freeze-blocks {blocks}: the backbone {model.config.backbone} has {have}; "
                        "choose fewer, or 0 to train every layer")
    stem = [getattr(bb, n) for n in ("conv_stem", "bn1", "stem") if hasattr(bb, n)]
    frozen = [p for part in stem + list(stages[:blocks]) for p in part.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)


def training_progress(epoch: int, cfg, elapsed_s: float) -> float:
    """How far training is, in [0, 1]: by epochs, or by the time budget when that runs out first.
    The LAP noise and the learning rate follow it, so a run stopped by --max-minutes still ends on
    hard negatives and a small learning rate."""
    by_epoch = epoch / max(1, cfg.epochs - 1)
    by_time = elapsed_s / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0
    return min(1.0, max(by_epoch, by_time))


def averaging(cfg, epochs_done: int, elapsed_s: float, last: bool) -> bool:
    """Whether the weights at the end of this epoch join the average: those of the epochs that end
    past `average_from` of the training (by epochs or by the clock, as `training_progress`), and
    always the last epoch's (so 1.0 keeps the last epoch's alone)."""
    if cfg.average_from is None:
        return False
    return last or epochs_done >= cfg.epochs or training_progress(epochs_done, cfg, elapsed_s) > cfg.average_from


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def catalog_fingerprint(records: list[Record]) -> str:
    """What the training photos were (paths, individuals, viewpoints, boxes): a resume refuses
    another set."""
    rows = sorted(f"{r.image}\x1f{r.individual_id}\x1f{r.viewpoint or ''}\x1f{r.bbox}" for r in records)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


@dataclass
class _State:
    epoch: int = 0
    best: float = -1.0
    best_state: dict | None = None
    history: list | None = None
    average: dict | None = None  # running mean of the weights of the epochs averaged (TrainConfig.average_from)
    averaged: int = 0  # how many epochs it holds


def add_to_average(state: _State, weights: dict) -> None:
    """Stochastic weight averaging (Izmailov et al. 2018): the running mean of the weights at the ends
    of epochs; integer buffers (BatchNorm's batch counter) are the latest."""
    state.averaged += 1
    if state.average is None:
        state.average = {k: v.detach().cpu().clone() for k, v in weights.items()}
        return
    for k, v in weights.items():
        if v.is_floating_point():
            state.average[k] += (v.detach().cpu().to(state.average[k].dtype) - state.average[k]) / state.averaged
        else:
            state.average[k] = v.detach().cpu().clone()


def fit(model: SiameseNet, catalog: Catalog, heldout: set, cfg, run: RunFolder, resume: bool = False,
        progress: bool = True, validation: set | None = None) -> dict:
    """Train on the individuals outside `heldout`; pick the epoch by validation MAP@5 on the
    `validation` individuals (default: all of `heldout`)."""
    device = next(model.parameters()).device
    train_recs = [r for r in catalog.records if r.individual_id not in heldout]
    val_ids = heldout if validation is None else validation
    val_recs = [r for r in catalog.records if r.individual_id in val_ids]
    t0 = time.perf_counter()
    images, labels_list, views_list = [], [], []
    for r in tqdm(train_recs, desc="loading training photos", unit="img", disable=not progress, leave=False):
        img = _load_resized(r, cfg.model.input_size)
        if img is not None:
            images.append(img)
            labels_list.append(r.individual_id)
            views_list.append(r.viewpoint or "")
    labels = np.array(labels_list)
    # positives pair photos of one individual AND one viewpoint: a left and a right flank carry
    # different patterns, so pairing them would teach the network noise
    pos_groups = np.array([f"{lab}\x1f{v}" for lab, v in zip(labels_list, views_list)])
    _, counts = np.unique(labels, return_counts=True)
    if (counts >= 2).sum() < 2:
        raise UserError("training needs at least 2 individuals with 2 or more readable photos outside the "
                        f"held-out ones (found {(counts >= 2).sum()}); use --epochs 0 for retrieval only")
    n = len(images)
    head_params = list(model.head.parameters()) + list(model.pool.parameters())
    if cfg.freeze_blocks:
        log.info("backbone stem and first %d stages frozen (%d parameters)", cfg.freeze_blocks,
                 freeze_early_layers(model, cfg.freeze_blocks))
    opt = torch.optim.AdamW([{"params": [p for p in model.backbone.parameters() if p.requires_grad],
                              "lr": cfg.lr_backbone},
                             {"params": head_params, "lr": cfg.lr_head}], weight_decay=cfg.weight_decay)
    miner = LapMiner()
    batch_miner = LapMiner(MinerConfig(recent_memory=0))  # local indices: nothing to remember across batches
    if cfg.mining not in ("epoch", "batch"):
        raise UserError(f"mining must be 'epoch' or 'batch', not {cfg.mining!r}")
    arcface = None
    class_of = {lab: k for k, lab in enumerate(sorted(set(labels_list)))}
    targets = torch.tensor([class_of[lab] for lab in labels_list], dtype=torch.long)
    if cfg.arcface_weight > 0:
        arcface = SubCenterArcFace(model.dim, len(class_of), cfg.arcface_subcenters, cfg.arcface_margin,
                                   cfg.arcface_scale, torch.Generator().manual_seed(cfg.seed)).to(device)
        opt.add_param_group({"params": list(arcface.parameters()), "lr": cfg.lr_head})
    rng = np.random.default_rng(cfg.seed)
    state = _State(history=[])
    embeddings = None  # (n, D) from the last epoch's forward passes
    resumed_scores = None
    fingerprint = catalog_fingerprint(train_recs)
    elapsed_before = 0.0  # training seconds of the epochs a checkpoint holds
    if resume and run.checkpoint_path.is_file():
        ck = torch.load(run.checkpoint_path, map_location=device, weights_only=False)
        if ck.get("catalog", fingerprint) != fingerprint:  # (checkpoints before the fingerprint: no check)
            raise UserError(f"--resume: the training photos differ from those of the checkpoint in {run.path} "
                            "(the catalog changed): train anew into another --out")
        model.load_state_dict(ck["model"])
        if arcface is not None and ck.get("arcface") is not None:
            arcface.load_state_dict(ck["arcface"])
        opt.load_state_dict(ck["optimizer"])
        rng.bit_generator.state = ck["rng"]
        embeddings = ck.get("embeddings")
        state = _State(epoch=ck["epoch"], best=ck["best"], best_state=ck["best_state"], history=ck["history"],
                       average=ck.get("average"), averaged=ck.get("averaged", 0))
        if ck.get("miner"):
            miner.load_state(ck["miner"])
        elapsed_before = ck.get("elapsed_s", 0.0)
        resumed_scores = ck.get("scores")
        log.info("resumed from %s at epoch %d", run.checkpoint_path, state.epoch)
    model.set_precision(model.precision)  # the memory format it asks for
    # fp16 (CUDA without bf16) needs loss scaling; fp32 and bf16 do not
    scaler = torch.amp.GradScaler(device.type, enabled=model.precision.name == "fp16")
    # a resumed run goes on where the time budget was: the learning rate and the LAP noise follow it
    t_start = time.perf_counter() - elapsed_before
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    stopped_by_budget = False
    scores = resumed_scores  # the miner's score matrix, refreshed every refresh_every epochs
    bsz = min(cfg.batch_size, n)
    scores_from_embeddings = scores is not None
    centered = cos_initialised = resume and run.checkpoint_path.is_file()
    if not centered:
        # the pretrained network's figure, so the epoch lines can be read against it; it is also the
        # first candidate for the kept checkpoint (training that never beats it changes nothing)
        val = validation_map5(model, val_recs, cfg.batch_size, set_center=True)
        centered = len(val) > 0
        if val:
            state.history.append({"epoch": 0, **val})
            log.info("before training: val MAP@5 emb %.3f head %.3f (%d held-out queries)",
                     val["val_map5_embedding"], val["val_map5_head"], val["val_queries"])
            state.best = val["val_map5_head"]
            state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    while state.epoch < cfg.epochs and not stopped_by_budget:
        epoch = state.epoch
        progress_frac = training_progress(epoch, cfg, time.perf_counter() - t_start)
        noise = noise_at(progress_frac, cfg.noise_start, cfg.noise_end)
        # the backbone warms up over the first epoch (the head starts from the cosine, but Adam's first
        # steps on a pretrained network are large), then both decay along a cosine
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))
        opt.param_groups[0]["lr"] = cfg.lr_backbone * decay * (0.1 if epoch == 0 else 1.0)
        for group in opt.param_groups[1:]:
            group["lr"] = cfg.lr_head * decay
        tm = time.perf_counter()
        if embeddings is None:
            scores = np.zeros((n, n), np.float32)  # untrained: the noise makes the negatives random
            miner_noise = max(noise, 1.0)
        else:
            if scores is None or not scores_from_embeddings or epoch % cfg.refresh_every == 0:
                scores = embeddings @ embeddings.T
                scores_from_embeddings = True
            miner_noise = noise
        na, nb = miner.mine_negatives(scores, labels, miner_noise, rng)
        neg = np.full(n, -1, np.int64)
        neg[na] = nb
        batches = build_batches(labels, na, nb, bsz, rng)
        mining_s = time.perf_counter() - tm
        train_mode(model)
        new_emb = np.zeros((n, model.dim), np.float32) if embeddings is None else embeddings.copy()
        losses, n_img, kept_neg, n_pairs = [], 0, 0, 0
        te = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress,
                   leave=False)
        for batch in bar:
            if len(batch) < bsz:  # fixed shapes: a new input shape costs seconds of re-compilation on CPU
                others = np.setdiff1d(np.arange(n), batch)
                batch = np.concatenate([batch, rng.choice(others, bsz - len(batch), replace=False)])
            x = model.prepare_input(torch.from_numpy(np.stack([augment(images[i], cfg, rng) for i in batch]))
                                    .to(device))
            with model.precision.autocast(device.type):
                f = model.features(x)
            f = f.float()
            with torch.no_grad():  # running mean of the features, as BatchNorm tracks its statistics
                mean_f = f.mean(0)
                model.center.copy_(mean_f if not centered else 0.9 * model.center + 0.1 * mean_f)
                centered = True
            e = model.normalize(f)
            if cfg.mining == "batch":
                mined = batch_mined_negatives(e, labels[batch], batch_miner, noise, rng)
            else:
                local = {int(g): k for k, g in enumerate(batch)}
                mined = np.array([local.get(int(neg[g]), -1) for g in batch])
            kept_neg += int((mined >= 0).sum())
            a, b, w, target = batch_pair_weights(pos_groups[batch], labels[batch], mined, cfg.mined_weight, device)
            if len(a) == 0:
                continue
            if not cos_initialised:  # start the cosine's logistic map between the positives' and negatives'
                cos = (e[a] * e[b]).sum(-1).detach()
                model.head.cos_bias.data.fill_(float(-model.head.cos_weight.data * (cos * w).sum() / w.sum()))
                cos_initialised = True
            logit = model.pair_logit(e[a], e[b])
            loss = ((F.binary_cross_entropy_with_logits(logit.float(), target, reduction="none") * w).sum()
                    + (F.binary_cross_entropy_with_logits(model.head.cosine_logit(e[a], e[b]), target,
                                                          reduction="none") * w).sum())
            if arcface is not None:
                loss = loss + cfg.arcface_weight * arcface(e, targets[batch].to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            new_emb[batch] = e.detach().cpu().numpy()
            losses.append(loss.item())
            n_img += len(batch)
            n_pairs += len(a)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if time.perf_counter() > deadline:
                stopped_by_budget = True
                break
        bar.close()
        train_s = time.perf_counter() - te
        embeddings = new_emb
        val = validation_map5(model, val_recs, cfg.batch_size)
        train_mode(model)
        state.epoch += 1
        line = {"epoch": state.epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                "noise": round(noise, 3), "mining_s": round(mining_s, 2), "train_s": round(train_s, 1),
                "images_per_s": round(n_img / train_s, 1) if train_s > 0 else 0.0,
                "pairs": n_pairs, "mined_negatives_in_batch": round(kept_neg / max(1, n), 3), **val}
        state.history.append(line)
        log.info("epoch %d/%d loss %.4f  mining %.1f s  %.1f img/s  val MAP@5 emb %s head %s%s", state.epoch,
                 cfg.epochs, line["loss"], mining_s, line["images_per_s"],
                 _fmt(val.get("val_map5_embedding")), _fmt(val.get("val_map5_head")),
                 "  (time budget reached)" if stopped_by_budget else "")
        # the best epoch by the score the engine ranks with (the pair head); the network kept unless
        # the weights are averaged
        score = val.get("val_map5_head", -1.0) if val else float(state.epoch)
        if score >= state.best:
            state.best = score
            state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if averaging(cfg, state.epoch, time.perf_counter() - t_start, stopped_by_budget):
            add_to_average(state, model.state_dict())
        with atomic_path(run.checkpoint_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "rng": rng.bit_generator.state, "embeddings": embeddings, "epoch": state.epoch,
                        "best": state.best, "best_state": state.best_state, "history": state.history,
                        "average": state.average, "averaged": state.averaged,
                        "arcface": arcface.state_dict() if arcface is not None else None,
                        "miner": miner.state(), "elapsed_s": time.perf_counter() - t_start,
                        "scores": scores if scores_from_embeddings else None, "catalog": fingerprint}, tmp)
    kept: dict = {"best_val": state.best}
    if state.averaged:
        model.load_state_dict(state.average)
        val = validation_map5(model, val_recs, cfg.batch_size)
        kept.update(averaged_epochs=state.averaged, val_map5_head_averaged=val.get("val_map5_head"),
                    val_map5_embedding_averaged=val.get("val_map5_embedding"))
        log.info("kept the mean of the weights of the last %d epochs: val MAP@5 emb %s head %s (best single epoch "
                 "head %.3f)", state.averaged, _fmt(val.get("val_map5_embedding")), _fmt(val.get("val_map5_head")),
                 state.best)
    elif state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.eval()
    return {"epochs_trained": state.epoch, "stopped_by_budget": stopped_by_budget, **kept,
            "train_photos": n, "heldout_individuals": len(heldout), "history": state.history,
            "train_seconds": round(time.perf_counter() - t0, 1)}
