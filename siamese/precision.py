"""Numeric precision of the network, chosen per machine.

bf16 autocast is only fast on a CPU that computes bf16 natively (AVX512-BF16 or AMX): there it ran
mobilenetv2_100 about 5x faster than fp32; on a CPU without it (AVX2 only, e.g. AMD EPYC Zen 1) it
ran about 6-10x SLOWER (224 px, 2 threads: fp32 32 images/s, bf16 3.6). So `auto` means fp32, unless
the CPU has native bf16 and a short measurement at first use confirms that bf16 is the faster one.
On CUDA, `auto` means bf16 where the GPU supports it, else fp16 (with loss scaling in training).

On CPU the network runs in channels_last memory: 2x faster than contiguous in fp32 on the AVX2
machine above (16 -> 32 images/s), and the format oneDNN's bf16 kernels want.
`bench/throughput.py` measures every precision and memory format on the machine it runs on.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.errors import UserError

log = logging.getLogger(__name__)

CHOICES = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 must beat fp32 by this factor in the first-use measurement to be chosen (timing noise)
_MIN_GAIN = 1.1
_ROUNDS = 3  # measurements of each precision, in turns (choose)


@dataclass(frozen=True)
class Precision:
    name: str = "fp32"  # fp32, bf16 or fp16: the autocast dtype (fp32: no autocast)
    channels_last: bool = False

    def autocast(self, device_type: str):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=_DTYPES[self.name])

    def to_dict(self) -> dict:
        return asdict(self)


def cpuinfo_fields(text: str | None = None) -> dict[str, str]:
    """Each key of /proc/cpuinfo (or of `text`) with its first value, i.e. the first CPU's; {} where
    there is no such file (not Linux)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_info() -> dict:
    """The CPU model, torch's CPU kernel level and whether the CPU computes bf16 natively (no flags, as
    off Linux: no claim of native bf16)."""
    fields = cpuinfo_fields()
    model = fields["model name"] if "model name" in fields else platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return {"cpu": model, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native, "threads": torch.get_num_threads()}


def _measurer(model, device: torch.device, input_size, batch: int = 8,
              repeats: int = 1) -> Callable[[Precision], float]:
    """`measure(precision) -> images/s`: forward passes of the real network on random input, one to warm
    up, then the best of `repeats`. They run on one copy in eval mode, made at the first measurement and
    reused by the others: in train mode they would update the network's batch-norm statistics with the
    random input (which once changed every embedding on CPUs with native bf16)."""
    copies: list = []

    def measure(precision: Precision) -> float:
        if not copies:
            copies.append(copy.deepcopy(model).eval())
        net = copies[0]
        fmt = torch.channels_last if precision.channels_last else torch.contiguous_format
        net.to(memory_format=fmt)
        x = torch.randn(batch, 3, *input_size, device=device).contiguous(memory_format=fmt)
        best = float("inf")
        with torch.no_grad(), precision.autocast(device.type):
            for k in range(repeats + 1):
                t = time.perf_counter()
                net.features(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if k:
                    best = min(best, time.perf_counter() - t)
        return batch / best

    return measure


def choose(requested: str, device_type: str, native_bf16: bool, cuda_bf16: bool,
           measure: Callable[[Precision], float]) -> tuple[Precision, dict[str, float]]:
    """The precision for `requested` on this machine; `measure(precision) -> images/s` is called only
    where the answer depends on it (auto on a CPU with native bf16). Returns the choice and what was
    measured."""
    if requested not in CHOICES:
        raise UserError(f"--precision {requested!r}: choose one of {', '.join(CHOICES)}")
    cl = device_type == "cpu"
    if requested == "fp16" and device_type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU: on CPU choose auto, fp32 or bf16")
    if requested != "auto":
        if requested == "bf16" and device_type == "cpu" and not native_bf16:
            log.warning("--precision bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16): expect it "
                        "to be several times slower than fp32")
        return Precision(requested, cl), {}
    if device_type == "cuda":
        return Precision("bf16" if cuda_bf16 else "fp16", False), {}
    if not native_bf16:
        return Precision("fp32", True), {}
    candidates = [Precision("fp32", True), Precision("bf16", True)]
    # in turns, compared within each turn (the median of the turns' ratios): a load that comes or goes while
    # measuring (another job starting on the machine) then slows one turn's two measurements alike, not
    # all of the precision measured second (once both measured 3.2 images/s under such a load, and fp32
    # was chosen on a CPU with AMX where bf16 runs 3.5x faster). Recorded: the best of each, and the median
    # ratio that decided ("bf16_per_fp32").
    measured = {p.name: 0.0 for p in candidates}
    ratios = []
    for _ in range(_ROUNDS):
        turn = {p.name: measure(p) for p in candidates}
        ratios.append(turn["bf16"] / max(turn["fp32"], 1e-9))
        measured = {k: max(v, turn[k]) for k, v in measured.items()}
    ratio = float(np.median(ratios))
    best = candidates[1] if ratio > _MIN_GAIN else candidates[0]
    return best, {**{k: round(v, 1) for k, v in measured.items()}, "bf16_per_fp32": round(ratio, 2)}


_memo: dict[tuple, tuple[Precision, dict]] = {}


def resolve(model, requested: str = "auto", recorded: dict | None = None, keep_given: bool = False) -> dict:
    """Choose the model's precision on this machine, set it on the model and return a record of the
    choice (for config.json). A record from an earlier command on the same CPU is reused without
    measuring again (with `keep_given`, also a choice that --precision gave it rather than a
    measurement: a resumed training keeps its precision); within one process the choice is made once
    per network shape."""
    device = next(model.parameters()).device
    info = cpu_info() if device.type == "cpu" else {"gpu": torch.cuda.get_device_name(device)}
    same_machine = bool(recorded) and all(recorded.get(k) == v for k, v in info.items() if k != "threads")
    key = (requested, device.type, model.config.backbone, tuple(model.config.input_size))
    if requested == "auto" and same_machine and (keep_given or recorded.get("requested") == "auto"):
        precision, measured = Precision(**recorded["choice"]), recorded.get("measured_images_per_s", {})
    elif key in _memo:
        precision, measured = _memo[key]
    else:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision, measured = choose(requested, device.type, bool(info.get("native_bf16")), cuda_bf16,
                                     _measurer(model, device, model.config.input_size))
        if measured:
            log.info("precision: %s chosen (measured images/s %s on %s)", precision.name, measured,
                     info.get("cpu"))
        _memo[key] = (precision, measured)
    model.set_precision(precision)
    return {"requested": requested, "choice": precision.to_dict(), **info, "measured_images_per_s": measured}
