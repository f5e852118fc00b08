"""Thread counts and devices, set once per command rather than read from the environment deep inside."""
from __future__ import annotations

import os
import random

import numpy as np


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def set_threads(n: int | None = None) -> int:
    """Set torch, faiss and OpenCV thread pools to n (default: the cores this process may use)."""
    n = n or default_threads()
    import cv2
    import torch

    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    return n


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # the same bits from the same seed: deterministic kernels where torch has a choice (on CPU the
    # multi-threaded weight-gradient sums otherwise differ run to run in the last bits)
    torch.use_deterministic_algorithms(True, warn_only=True)


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
