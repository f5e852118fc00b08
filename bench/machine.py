"""What every benchmark prints first: the machine it measured on (the CPU changes between sessions)."""
from __future__ import annotations

from pathlib import Path

import torch

from siamese.precision import cpu_info


def cpu_generation(cpuinfo: str | None = None) -> str:
    """"family F model M stepping S" of the first CPU in /proc/cpuinfo (x86), or "" where it is not
    given. The model name alone can be generic ("AMD EPYC" for CPUs with and without native bf16)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep:
            if found:
                break  # the end of the first CPU's block
            continue
        if key in ("cpu family", "model", "stepping") and key not in found:
            found[key] = value.strip()
    if "cpu family" not in found or "model" not in found:
        return ""
    return " ".join(f"{label} {found[key]}" for label, key in
                    (("family", "cpu family"), ("model", "model"), ("stepping", "stepping")) if key in found)


def describe() -> dict:
    info = cpu_info()
    info["cpu_generation"] = cpu_generation()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["torch"] = torch.__version__
    return info


def headline(info: dict | None = None) -> str:
    info = info or describe()
    generation = f" {info['cpu_generation']}" if info.get("cpu_generation") else ""
    return (f"machine: {info['cpu']}{generation} ({info['torch_cpu_capability']}, native bf16: "
            f"{', '.join(info['native_bf16']) or 'no'}), {info['threads']} threads"
            + (f", GPU {info['gpu']}" if "gpu" in info else "") + f"; torch {info['torch']}")
