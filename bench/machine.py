"""What every benchmark prints first: the machine it measured on (the CPU changes between sessions)."""
from __future__ import annotations

import torch

from siamese.precision import cpu_info


def describe() -> dict:
    info = cpu_info()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["torch"] = torch.__version__
    return info


def headline(info: dict | None = None) -> str:
    info = info or describe()
    return (f"machine: {info['cpu']} ({info['torch_cpu_capability']}, native bf16: "
            f"{', '.join(info['native_bf16']) or 'no'}), {info['threads']} threads"
            + (f", GPU {info['gpu']}" if "gpu" in info else "") + f"; torch {info['torch']}")
