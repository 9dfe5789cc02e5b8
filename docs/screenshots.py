"""Regenerate the dashboard screenshots under docs/ (Chromium + Playwright, server on 127.0.0.1).

    .venv/bin/python docs/screenshots.py DASHBOARD_SPEC.yaml [--out docs]

Writes dashboard-pareto.png, dashboard-hypervolume.png, dashboard-trials.png,
dashboard-trial-detail.png and report.png.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    out = Path(args.out)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "gsmsearch", "dashboard", args.spec, "--port", str(port)])
    address = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(address, timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000}, device_scale_factor=1)
            page.goto(address)
            page.wait_for_selector("#pareto-0 .scatterlayer .trace .point")
            page.wait_for_selector(".budget-table")
            page.wait_for_timeout(800)
            top = page.locator("#section-pareto").bounding_box()
            bottom = page.locator("#section-compare").bounding_box()
            page.screenshot(path=str(out / "dashboard-pareto.png"), full_page=True,
                            clip={"x": 0, "y": 0, "width": 1500, "height": bottom["y"] + bottom["height"] - 0})
            hv = page.locator("#section-hypervolume").bounding_box()
            budgets = page.locator("#section-budgets").bounding_box()
            page.screenshot(path=str(out / "dashboard-hypervolume.png"), full_page=True,
                            clip={"x": 0, "y": hv["y"], "width": 1500,
                                  "height": budgets["y"] + budgets["height"] - hv["y"] + 10})
            page.locator("#section-trials").screenshot(path=str(out / "dashboard-trials.png"))
            # open the cheapest GBLR front trial
            point = page.locator("#pareto-0 .scatterlayer .trace").first.locator(".point").first
            page.locator("#pareto-0").scroll_into_view_if_needed()
            box = point.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.wait_for_selector("#detail-title")
            page.wait_for_selector(".structure-heatmap .heatmaplayer .hm", state="attached")
            page.wait_for_timeout(800)
            page.locator("#section-detail").screenshot(path=str(out / "dashboard-trial-detail.png"))
            # the static report
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp) / "report.html"
                subprocess.run([sys.executable, "-m", "gsmsearch", "report", args.spec, "-o", str(report)], check=True)
                page.goto(report.as_uri())
                page.wait_for_selector("#pareto-0 .scatterlayer .trace")
                page.wait_for_timeout(800)
                page.screenshot(path=str(out / "report.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    print("wrote", ", ".join(str(out / n) for n in ("dashboard-pareto.png", "dashboard-hypervolume.png",
                                                    "dashboard-trials.png", "dashboard-trial-detail.png",
                                                    "report.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
