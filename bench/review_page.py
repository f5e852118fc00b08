#!/usr/bin/env python3
"""The review page's size and first-screen time, in headless Chromium (the system's).

Builds a page of N queries from the development set's photos (each with 5 different gallery photos:
the worst case for size, no thumbnail shared), opens it from disk and reports the time from
navigation to the first screen shown (the first page's query cards rendered and every image in
the viewport decoded). Prints a table and writes bench/results/review_page.json.

  python bench/review_page.py [--queries 200] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.accuracy import DATA  # noqa: E402
from bench.machine import describe, headline  # noqa: E402
from engine.report import ReportCandidate, ReportQuery, write_report  # noqa: E402
from tests.conftest import find_chromium  # noqa: E402

FIRST_SCREEN = """() => new Promise(resolve => {
  const check = () => {
    const cards = document.querySelectorAll("section.query");
    const imgs = [...document.querySelectorAll("section.query img")].filter(i => {
      const r = i.getBoundingClientRect(); return r.top < innerHeight && r.bottom > 0; });
    if (cards.length && imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0))
      resolve(performance.now());
    else requestAnimationFrame(check);
  };
  check();
})"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    files = sorted((DATA / "images").rglob("*.jpg"))
    if len(files) < 6 * args.queries:
        sys.exit(f"development set not found at {DATA} (or too small): nothing to measure")
    exe = find_chromium()
    if exe is None:
        sys.exit("no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    machine = describe()
    print(headline(machine), flush=True)
    n = args.queries
    rng = np.random.default_rng(0)
    entries = [ReportQuery(files[i], f"q{i}", None, i / n,
                           [ReportCandidate(f"W{j}", 0.5, {"embedding": 0.5, "keypoints": 0.5}, files[n + 5 * i + j],
                                            f"g{j}", rng.uniform(0, 500, (60, 4))) for j in range(5)])
               for i in range(n)]
    work = Path(tempfile.mkdtemp(prefix="review-bench-"))
    try:
        t0 = time.perf_counter()
        page = write_report(work / "review.html", entries, "bench")
        write_s = time.perf_counter() - t0
        page_bytes = page.stat().st_size
        thumbs = sum(f.stat().st_size for f in page.with_name("review_files").iterdir())
        from playwright.sync_api import sync_playwright

        times = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            for _ in range(args.repeats):
                ctx = browser.new_context(viewport={"width": 1280, "height": 900})
                tab = ctx.new_page()
                tab.goto(page.as_uri(), wait_until="commit")
                times.append(tab.evaluate(FIRST_SCREEN) / 1000)  # ms since navigation start
                ctx.close()
            browser.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"queries": n, "page_mb": round(page_bytes / 1e6, 3), "thumbnails_mb": round(thumbs / 1e6, 3),
           "total_mb": round((page_bytes + thumbs) / 1e6, 3), "write_seconds": round(write_s, 1),
           "first_screen_s_median": round(statistics.median(times), 3), "first_screen_s_max": round(max(times), 3),
           "chromium": exe}
    print("| queries | page MB | thumbnails MB | total MB | first screen (median / max of %d) |" % args.repeats)
    print("|---|---|---|---|---|")
    print(f"| {n} | {res['page_mb']} | {res['thumbnails_mb']} | {res['total_mb']} | "
          f"{res['first_screen_s_median']} s / {res['first_screen_s_max']} s |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "review_page.json").write_text(json.dumps({"machine": machine, **res}, indent=1))
    print(f"wrote {out / 'review_page.json'}")


if __name__ == "__main__":
    main()
