"""Report at scale: a synthetic run of N images (typical opinion, labels and maps per image); prints JSON.

    python tests/benchmarks/report_scale.py [--images 10000]

It times writing the report (``report.html`` and its page and index files), reports
their sizes, and, when playwright and a Chromium are present, how long the page takes
to open and draw its first page, change page and filter by a rare word (each until its
cards are drawn). No model runs: the per-image files are written directly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.run.config import to_dict  # noqa: E402
from pipeline.doctor import find_chromium  # noqa: E402
from pipeline.run.images import ImageRef  # noqa: E402
from pipeline.run.provenance import Status  # noqa: E402
from pipeline.run.rundir import RunDir  # noqa: E402
from stages import RunConfig  # noqa: E402
from stages.report import ReportConfig, ReportPages, build_report_data, read_report_inputs  # noqa: E402

WORDS = [f"word{i}" for i in range(400)] + ["sprinkorange", "breakfabeatrice", "abhinpassenger"]


def make_run(root: Path, n: int) -> None:
    run = RunDir(root)
    refs = [ImageRef(id=f"img_{i:06d}.jpg-{i:012x}", path=f"/data/photos/img_{i:06d}.jpg", rel=f"img_{i:06d}.jpg")
            for i in range(n)]
    run.save_images(refs)
    for sub in ("ascend", "labels", "surgery"):
        (root / sub).mkdir(parents=True)
    for i, ref in enumerate(refs):
        words = {WORDS[(i * 7 + k) % len(WORDS)]: {"frequency": 20 - k} for k in range(20)}
        (root / "ascend" / f"{ref.id}.json").write_text(json.dumps({"words": words}))
        labels = [{"word": w, "frequency": d["frequency"], "score": 0.2, "rank": r} for r, (w, d) in enumerate(list(words.items())[:10], 1)]
        prompts = [{"text": " ".join(list(words)[:5]), "score": 0.3}] * 5
        (root / "labels" / f"{ref.id}.json").write_text(json.dumps({"labels": labels, "prompts": prompts}))
        maps = [{"word": d["word"], "slug": d["word"],
                 "overlays": {m: run.rel(run.overlay(ref.id, d["word"], m)) for m in ("raw", "surgery", "single")},
                 "points": [[10 * k, 10 * k] for k in range(16)], "point_labels": [1] * 8 + [0] * 8} for d in labels]
        (root / "surgery" / f"{ref.id}.json").write_text(json.dumps(
            {"size": [640, 480], "methods": ["raw", "surgery", "single"], "labels": maps, "sheet": run.rel(run.sheet(ref.id))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=10000)
    args = ap.parse_args()
    out: dict = {"images": args.images}
    with tempfile.TemporaryDirectory() as tmp:
        maker = multiprocessing.get_context("spawn").Process(target=make_run, args=(Path(tmp) / "run", args.images))
        maker.start()  # in a process of its own, so this one's peak memory is the report's
        maker.join()
        run = RunDir(Path(tmp) / "run")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.time()
        pages = ReportPages(run.root, ReportConfig().page_size)  # as the report stage writes it
        data = build_report_data(read_report_inputs(run, to_dict(RunConfig()), lambda i, s, latest: Status("done")),
                                 ReportConfig(), pages)
        written = pages.finish(data)
        out["write_seconds"] = round(time.time() - t, 2)
        out["peak_rss_mib_before_write"] = round(before / 1024)
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        path = run.file("report.html")
        sizes = [run.file(rel).stat().st_size for rel in written]
        out["html_mib"] = round(path.stat().st_size / 2**20, 3)
        out["files"] = len(written)
        out["all_files_mib"] = round(sum(sizes) / 2**20, 2)
        out["bytes_per_image"] = round(sum(sizes) / args.images)
        exe = find_chromium()
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            exe = None
        if exe:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
                tab = browser.new_page()
                t = time.time()
                tab.goto(path.as_uri(), wait_until="domcontentloaded")
                tab.wait_for_selector(".card")
                out["browser_first_page_seconds"] = round(time.time() - t, 2)
                out["cards_drawn"] = tab.locator(".card").count()
                t = time.time()
                tab.click("#next")
                tab.wait_for_function("() => document.getElementById('page').textContent.startsWith('page 2 ')"
                                      " && document.querySelectorAll('.card').length > 0")
                out["browser_next_page_seconds"] = round(time.time() - t, 2)
                out["page_text"] = tab.inner_text("#page")
                word = "sprinkorange"
                expected = sum(any(word in WORDS[(i * 7 + k) % len(WORDS)] for k in range(20)) for i in range(args.images))
                t = time.time()
                tab.fill("#filter", word)
                tab.wait_for_function("n => document.getElementById('count').textContent.startsWith(n + ' of ')",
                                      arg=expected)
                out["browser_filter_seconds"] = round(time.time() - t, 2)
                out["filtered_count_text"] = tab.inner_text("#count")
                browser.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
