#!/usr/bin/env python3
"""Network throughput on this machine, for each precision and memory format, and the auto choice.

For fp32 and bf16 autocast (fp16 too on a GPU), each in contiguous and channels_last memory:
  embed   images/s of the gallery embedding (no grad, batch --batch)
  train   images/s of one training step (forward, pair loss over the batch, backward, AdamW step)
then the precision `--precision auto` chooses here, and whether it is within 10% of the best.
Prints the CPU model and torch's CPU capability, a table, and writes bench/results/throughput.json.

  python bench/throughput.py [--input-size 224x224] [--batch 32] [--train-batch 16] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.machine import describe, headline  # noqa: E402
from core.runtime import set_threads, torch_device  # noqa: E402
from siamese import precision as P  # noqa: E402
from siamese.model import ModelConfig, SiameseNet  # noqa: E402


def _timed(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call (kernel selection)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def measure(model: SiameseNet, precision: P.Precision, device, size, batch: int, train_batch: int,
            repeats: int) -> dict:
    model.set_precision(precision)
    x = model.prepare_input(torch.randn(batch, 3, *size, device=device))
    xt = model.prepare_input(torch.randn(train_batch, 3, *size, device=device))
    labels = torch.arange(train_batch, device=device) // 2  # pairs of one "individual"
    target = (labels[:, None] == labels[None, :]).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")

    def embed():
        model.eval()
        with torch.no_grad(), precision.autocast(device.type):
            model.features(x)

    def step():
        model.train()
        with precision.autocast(device.type):
            f = model.features(xt)
        e = model.normalize(f.float())
        i, j = torch.triu_indices(train_batch, train_batch, 1, device=device)
        loss = F.binary_cross_entropy_with_logits(model.pair_logit(e[i], e[j]), target[i, j])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return {"embed_images_per_s": round(batch / _timed(embed, repeats), 1),
            "train_images_per_s": round(train_batch / _timed(step, repeats), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", default="224x224", help="HEIGHTxWIDTH")
    ap.add_argument("--batch", type=int, default=32, help="embedding batch")
    ap.add_argument("--train-batch", type=int, default=16, help="training batch")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per setting (the fastest counts)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    size = tuple(int(v) for v in args.input_size.lower().split("x"))
    device = torch_device()
    info = describe()
    print(f"{headline(info)}; mobilenetv2_100 at {size[0]}x{size[1]}", flush=True)
    names = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    rows = []
    for name in names:
        for cl in (False, True):
            torch.manual_seed(0)
            model = SiameseNet(ModelConfig(input_size=size)).to(device)
            r = {"precision": name, "memory_format": "channels_last" if cl else "contiguous",
                 **measure(model, P.Precision(name, cl), device, size, args.batch, args.train_batch, args.repeats)}
            rows.append(r)
            print(f"  {name:5s} {r['memory_format']:14s} embed {r['embed_images_per_s']:7.1f} img/s   "
                  f"train {r['train_images_per_s']:7.1f} img/s", flush=True)
    model = SiameseNet(ModelConfig(input_size=size)).to(device)
    t = time.perf_counter()
    record = P.resolve(model, "auto")
    choice_s = time.perf_counter() - t
    auto = next(r for r in rows if r["precision"] == record["choice"]["name"]
                and (r["memory_format"] == "channels_last") == record["choice"]["channels_last"])
    verdict = {}
    for key in ("embed_images_per_s", "train_images_per_s"):
        best = max(rows, key=lambda r: r[key])
        verdict[key] = {"auto": auto[key], "best": best[key], "best_setting": f"{best['precision']} "
                        f"{best['memory_format']}", "auto_within_10pct": auto[key] >= 0.9 * best[key]}
    print(f"\n{'':24s}{'auto':>10s}{'best':>10s}  best setting            auto within 10%")
    for key, v in verdict.items():
        print(f"{key:24s}{v['auto']:10.1f}{v['best']:10.1f}  {v['best_setting']:24s}{'yes' if v['auto_within_10pct'] else 'NO'}")
    print(f"auto chose {record['choice']['name']} "
          f"{'channels_last' if record['choice']['channels_last'] else 'contiguous'} in {choice_s:.1f} s"
          + (f" (measured {record['measured_images_per_s']})" if record["measured_images_per_s"] else
             " (no measurement needed: no native bf16)" if device.type == "cpu" else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "torch": torch.__version__, "threads": threads,
                                    "input_size": size, "batch": args.batch, "train_batch": args.train_batch,
                                    "rows": rows, "auto": record, "verdict": verdict}, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
