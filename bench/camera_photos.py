#!/usr/bin/env python3
"""Camera-size photos: what decoding a large JPEG reduced (core.images.load_image's `min_side`)
saves per photo, and how little it changes.

Photos of the development set (<= 512 px) are enlarged to `--side` pixels on their long side (a
24-megapixel camera's 6000 by default, a little sensor grain added so that the JPEG holds detail
as a camera's does) and saved at quality 92 in a temporary folder. For each photo, full decoding
against reduced decoding:
  decode     seconds to decode (reduced: to the keypoints' working size, 512)
  keypoints  seconds of the keypoint stage's extraction (decode, focus map, SIFT, RootSIFT)
  embedding  seconds of the network's input (decode, focus box, resize) and of its forward pass
and what changes: the share of keypoints within a photo pixel of the full decode's (per working
pixel: one working pixel is side/512 photo pixels), the cosine between the two embeddings (beside
those of a reduction to 2x the input size and of the photo saved again as a JPEG at quality 85), and
the accepted inliers between two photos of one flank from two sightings (`--pairs` of them).
Prints the machine, a table, and writes bench/results/camera_photos.json.

  python bench/camera_photos.py [--data DIR] [--pairs 8] [--side 6000]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine.pipeline  # noqa: E402,F401  (the torchvision schemas before timm)
import cv2  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.machine import describe, headline  # noqa: E402
from core.catalog import Record  # noqa: E402
from core.images import load_image  # noqa: E402
from core.runtime import set_threads  # noqa: E402
from keypoints.features import PRESETS, Keypoints, extract_keypoints  # noqa: E402
from keypoints.store import extract_arrays  # noqa: E402
from keypoints.verify import verify_pair  # noqa: E402
from siamese.embed import features_batch, load_for_model  # noqa: E402
from siamese.focus import FocusMap, focus_crop  # noqa: E402
from siamese.model import ModelConfig, SiameseNet, preprocess  # noqa: E402

NYALA = Path(os.environ.get("NYALA_DATA") or ROOT.parent / "shared" / "data" / "nyala")


def photo_pairs(data: Path, n: int) -> list[tuple[str, str]]:
    """`n` pairs of photos of one individual's flank from two sightings, spread over the set."""
    with open(data / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_flank: dict = {}
    for r in rows:
        by_flank.setdefault((r["individual_id"], r["side"]), []).append(r)
    pairs = []
    for photos in by_flank.values():
        other = [p for p in photos[1:] if p["sighting_id"] != photos[0]["sighting_id"]]
        if other:
            pairs.append((photos[0]["image"], other[0]["image"]))
    return pairs[:: max(1, len(pairs) // n)][:n]


def camera_copies(data: Path, images: list[str], side: int, folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for image in images:
        rgb = np.asarray(Image.open(data / image).convert("RGB"))
        h, w = rgb.shape[:2]
        s = side / max(h, w)
        big = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)
        big = np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)
        path = folder / f"{len(out)}.jpg"
        Image.fromarray(big).save(path, quality=92)
        out.append(path)
    return out


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=NYALA, help="folder with catalog.csv and the photos")
    ap.add_argument("--pairs", type=int, default=8, help="pairs of photos of one flank from two sightings")
    ap.add_argument("--side", type=int, default=6000, help="long side of the enlarged photos, pixels")
    args = ap.parse_args()
    if not (args.data / "metadata.csv").is_file():
        sys.exit(f"no metadata.csv in {args.data}: give the development set with --data (or NYALA_DATA)")
    set_threads(1)
    info = describe()
    print(headline(info))
    kcfg, focus = PRESETS["default"], FocusMap()
    net = SiameseNet(ModelConfig()).eval().float()  # the bundled ImageNet network, 224x224, the focus box
    mcfg = net.config
    extract = lambda image: extract_keypoints(image, kcfg, focus)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = photo_pairs(args.data, args.pairs)
        paths = camera_copies(args.data, [im for pair in pairs for im in pair], args.side, Path(tmp))
        kps: dict = {"full": [], "reduced": []}
        focus(np.zeros((64, 64, 3), np.uint8))  # the focus network built before any timing
        for path in paths:
            rec = Record(image=path.name, path=path, individual_id=None)
            row = {"pixels": int(np.prod(Image.open(path).size))}
            feats = {}
            for mode, min_side in (("full", None), ("reduced", kcfg.max_side)):
                _, row[f"decode_{mode}_s"] = timed(lambda: load_image(path, min_side=min_side))
                (arrays, _, _), row[f"keypoints_{mode}_s"] = timed(lambda: extract_arrays(rec, extract, min_side))
                kps[mode].append(Keypoints.from_arrays(arrays))
                if mode == "full":
                    x, t_in = timed(lambda: preprocess(load_for_model_full(rec, mcfg), mcfg))
                else:
                    x, t_in = timed(lambda: preprocess(load_for_model(rec, mcfg), mcfg))
                f, t_net = timed(lambda: features_batch(net, x[None], 1)[0])
                row[f"embed_input_{mode}_s"], row[f"embed_net_{mode}_s"] = t_in, t_net
                feats[mode] = f / np.linalg.norm(f)
            full, reduced = kps["full"][-1], kps["reduced"][-1]
            d = np.linalg.norm(reduced.xy[:, None] - full.xy[None], axis=2).min(axis=1)
            px = args.side / kcfg.max_side  # photo pixels per working pixel
            row["keypoints"] = [len(full), len(reduced)]
            row["within_1_working_px"] = float(np.mean(d < px))
            row["embedding_cosine"] = float(feats["full"] @ feats["reduced"])
            # for scale: reduced to 2x the input size only, and the full photo saved again as a JPEG
            resaved = path.with_suffix(".q85.jpg")
            Image.open(path).save(resaved, quality=85)
            for name, rgb in (("2x", load_image(path, min_side=2 * max(mcfg.input_size))),
                              ("resaved_q85", load_image(resaved))):
                f = features_batch(net, preprocess(focus_crop(rgb), mcfg)[None], 1)[0]
                row[f"embedding_cosine_{name}"] = float(feats["full"] @ (f / np.linalg.norm(f)))
            rows.append(row)
            print(f"  {path.name}: {row['pixels'] / 1e6:.1f} MP, keypoints {row['keypoints']}, "
                  f"within a working pixel {row['within_1_working_px']:.3f}, cosine {row['embedding_cosine']:.4f}")
    # the identification signal: accepted inliers between the two sightings' photos (whitening aside)
    inliers = {m: [verify_pair(kps[m][2 * i], kps[m][2 * i + 1]).n_inliers for i in range(len(pairs))]
               for m in ("full", "reduced")}
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.endswith("_s")}
    per_photo = {m: mean[f"keypoints_{m}_s"] + mean[f"embed_input_{m}_s"] + mean[f"embed_net_{m}_s"]
                 for m in ("full", "reduced")}
    print(f"\n{len(rows)} photos of {args.side} px on the long side, seconds per photo (one thread):")
    print("| decoding | decode | keypoint extraction | network input | network | per photo (keypoints + embedding) |")
    print("|---|---|---|---|---|---|")
    for m in ("full", "reduced"):
        print(f"| {m} | {mean[f'decode_{m}_s']:.3f} | {mean[f'keypoints_{m}_s']:.3f} | "
              f"{mean[f'embed_input_{m}_s']:.3f} | {mean[f'embed_net_{m}_s']:.3f} | {per_photo[m]:.3f} |")
    within = [r["within_1_working_px"] for r in rows]
    cos = [r["embedding_cosine"] for r in rows]
    cos2 = [r["embedding_cosine_2x"] for r in rows]
    cosq = [r["embedding_cosine_resaved_q85"] for r in rows]
    print(f"speed-up per photo {per_photo['full'] / per_photo['reduced']:.1f}x; keypoints within a working "
          f"pixel of the full decode's: mean {np.mean(within):.3f} (min {np.min(within):.3f}); embedding "
          f"cosine mean {np.mean(cos):.4f} (min {np.min(cos):.4f}); reduced to 2x the input size instead "
          f"{np.mean(cos2):.4f} (min {np.min(cos2):.4f}); the full photo saved again at JPEG quality 85 "
          f"{np.mean(cosq):.4f} (min {np.min(cosq):.4f})")
    print(f"accepted inliers between the two sightings of {len(pairs)} flanks: full {inliers['full']}, "
          f"reduced {inliers['reduced']}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "camera_photos.json").write_text(json.dumps(
        {"machine": info, "side": args.side, "pairs": pairs, "photos": rows, "mean_s": mean,
         "per_photo_s": per_photo, "inliers": inliers}, indent=2))
    print(f"wrote {out / 'camera_photos.json'}")


def load_for_model_full(rec: Record, cfg: ModelConfig) -> np.ndarray:
    """load_for_model as before reduced decoding: the whole photo decoded, then the focus box."""
    rgb = load_image(rec.path, rec.bbox)
    return focus_crop(rgb) if cfg.crop == "focus" and rec.bbox is None else rgb


if __name__ == "__main__":
    with torch.no_grad():
        main()
