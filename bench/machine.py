"""What every benchmark prints first: the machine it measured on (the CPU changes between sessions)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too: `python bench/machine.py`

import torch  # noqa: E402

from siamese.precision import cpu_info, cpuinfo_fields  # noqa: E402


def cpu_generation(cpuinfo: str | None = None) -> str:
    """"family F model M stepping S" of the first CPU in /proc/cpuinfo (or `cpuinfo`; x86), or "" where
    it is not given. The model name alone can be generic ("AMD EPYC" for CPUs with and without native
    bf16)."""
    f = cpuinfo_fields(cpuinfo)
    if "cpu family" not in f or "model" not in f:
        return ""
    return f"family {f['cpu family']} model {f['model']}" + (f" stepping {f['stepping']}" if "stepping" in f else "")


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


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true", help="the whole description as JSON")
    args = ap.parse_args()
    print(json.dumps(describe(), indent=1) if args.json else headline())
