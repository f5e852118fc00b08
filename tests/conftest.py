"""Shared fixtures: a small synthetic sample from the repo's own generator, and the real photos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NYALA = ROOT.parent / "shared" / "data" / "nyala"

# Small, fast settings: tests check behaviour, benchmarks check accuracy.
TINY_INPUT = (64, 96)


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """catalog.csv of 8 synthetic individuals x 4 photos, with left/right viewpoints."""
    from engine.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("sample"), n_individuals=8, photos_per_individual=2,
                        seed=1, size=(96, 128), viewpoints=("left", "right"))


@pytest.fixture(scope="session")
def nyala() -> Path:
    if not (NYALA / "catalog.csv").is_file():
        pytest.skip(f"real development photos not found at {NYALA} (they live in ../shared, beside the repo)")
    return NYALA


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
