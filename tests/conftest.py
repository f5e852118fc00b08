"""Shared fixtures: a small synthetic sample from the repo's own generator, and the real photos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the development set of real photos (not distributed with the engine): $NYALA_DATA, else beside the repo
NYALA = Path(os.environ.get("NYALA_DATA") or ROOT.parent / "shared" / "data" / "nyala")

# Small, fast settings: tests check behaviour, benchmarks check accuracy.
TINY_INPUT = (64, 96)


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """catalog.csv of 8 synthetic individuals x 4 photos, with left/right viewpoints."""
    from engine.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("sample"), n_individuals=8, photos_per_individual=2,
                        seed=1, size=(96, 128), viewpoints=("left", "right"))


PHOTO_SIZE = (192, 256)  # (h, w) of the `photos` fixture's synthetic photos


@pytest.fixture(scope="session")
def photos():
    """Two photos of individual A, one of individual B (left flank, seeded): keypoint tests' known answers."""
    import numpy as np

    from engine.synthetic import make_individual, render_photo

    a, b = make_individual("A", 101), make_individual("B", 202)
    rng = np.random.default_rng(1)
    return {"a1": render_photo(a, rng, "left", PHOTO_SIZE), "a2": render_photo(a, rng, "left", PHOTO_SIZE),
            "b": render_photo(b, rng, "left", PHOTO_SIZE)}


@pytest.fixture(scope="session")
def nyala() -> Path:
    if not (NYALA / "catalog.csv").is_file():
        pytest.skip(f"real development photos not found at {NYALA} (set NYALA_DATA to their folder)")
    return NYALA


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """$CHROMIUM, else a Chromium or Chrome on PATH (Debian's package: /usr/bin/chromium)."""
    import shutil

    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from the system, driven by Playwright (never Playwright's own browser
    download). Missing, it FAILS the test: the review page must be tested in a real browser."""
    exe = find_chromium()
    if exe is None:
        pytest.fail("no Chromium found (set $CHROMIUM or install it: apt-get install chromium); the review "
                    "page is tested in a real browser, so this test cannot pass without one")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()
