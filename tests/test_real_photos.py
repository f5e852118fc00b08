"""The engine on a few real nyala photos from ../shared/data (skipped where that folder is absent)."""
import csv
import json
import shutil

import pytest
from typer.testing import CliRunner

from cli import app

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_real_photos_end_to_end(nyala, tmp_path):
    with open(nyala / "metadata.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["original_split"] == "test"][:40]
    cat = tmp_path / "catalog.csv"
    with open(cat, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "individual_id", "viewpoint"])
        w.writerows((r["image"], r["individual_id"], r["side"]) for r in rows)
    run = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["train-siamese", "--catalog", str(cat), "--images", str(nyala), "--out", str(run),
                            "--epochs", "0", "--input-size", "160x224", "-q"])
    assert r.exit_code == 0, r.output
    # a re-photographed copy (same pixels, new file) of a gallery photo must come back first
    qdir = tmp_path / "q"
    qdir.mkdir()
    picks = rows[::7]
    for k, row in enumerate(picks):
        shutil.copyfile(nyala / row["image"], qdir / f"{k}.jpg")
    r = runner.invoke(app, ["match", str(qdir), "--run", str(run), "--out", str(tmp_path / "p.csv"), "-q"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "p.json").read_text())
    got = {q["image"]: q["candidates"][0]["individual_id"] for q in ev["queries"]}
    assert got == {f"{k}.jpg": row["individual_id"] for k, row in enumerate(picks)}
