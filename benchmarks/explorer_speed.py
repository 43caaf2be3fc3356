"""How fast explorer.html follows a drag on the latent plane, in headless Chromium.

Writes the page of the default conv CVAE (channels 32-64-128, 500 units, latent 2; untrained: the
speed does not depend on the weights' values) with the current template and with another one
(by default the main branch's, `git show main:assets/explorer_template.html`), then drags the
mouse across each page's plane, 120 moves sent as fast as Playwright sends them (each waits
until the page has taken the previous one), through Playwright on the system Chromium. It
reports, for each page:
  ms/frame   the drag's wall time over the frames the page drew (1000 / frames per second)
  main ms    the mean time the page's main thread spent in one animation-frame callback
  lag ms     from the last move to the page drawing it (the backlog a slow page piles up)

    python benchmarks/explorer_speed.py [--before PATH] [--arch conv] [--model cvae]
"""
import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import explorer  # noqa: E402
import models  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MOVES = 120

# Counts animation-frame callbacks and their main-thread time, installed before the page's scripts.
COUNT_FRAMES = """
window.__frames = []; window.__lastFrame = 0;
const __raf = window.requestAnimationFrame.bind(window);
window.requestAnimationFrame = cb => __raf(t => {
  const t0 = performance.now(); cb(t); const t1 = performance.now();
  window.__frames.push(t1 - t0); window.__lastFrame = t1;
});
"""


def write_pages(folder, arch, model, before):
    torch.manual_seed(0)
    net = models.build_model(model, arch, 2 if model == "cvae" else 20, 0).eval()
    x, y = torch.rand(3000, 1, 28, 28), torch.randint(0, 10, (3000,))
    payload = explorer.page_payload(net, x, y, {}, [1.0] * net.latent_dim, (), 0)
    pages = {}
    for name, template in (("before", before), ("after", explorer.TEMPLATE)):
        pages[name] = Path(folder) / f"{name}.html"
        pages[name].write_text(explorer.fill_template(payload, template), encoding="utf-8")
    return pages


def drag(page):
    """Mouse down at the plane's centre, 120 moves around a circle, release; the measurements."""
    box = page.locator("#plane").bounding_box()
    cx, cy, r = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["width"] / 4
    page.mouse.move(cx + r, cy)
    page.mouse.down()
    page.evaluate("window.__frames = []")
    start = time.perf_counter()
    for k in range(1, MOVES + 1):
        angle = 2 * math.pi * k / MOVES
        page.mouse.move(cx + r * math.cos(angle), cy + r * math.sin(angle))
    last_move = page.evaluate("performance.now()")
    page.mouse.up()
    page.wait_for_timeout(1500)                        # let a backlog drain
    frames, last_frame = page.evaluate("[window.__frames, window.__lastFrame]")
    wall_ms = 1000 * (time.perf_counter() - start)
    drawn = [f for f in frames if f > 0.05]             # callbacks that drew something
    return {"frames": len(drawn), "ms_per_frame": (wall_ms - 1500) / max(1, len(drawn)),
            "main_ms": sum(drawn) / max(1, len(drawn)), "lag_ms": max(0.0, last_frame - last_move)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="the template to compare with (default: the main branch's)")
    parser.add_argument("--arch", default="conv")
    parser.add_argument("--model", default="cvae")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as folder:
        before = args.before
        if before is None:
            before = Path(folder) / "main_template.html"
            before.write_text(subprocess.run(["git", "show", "main:assets/explorer_template.html"], cwd=ROOT,
                                             capture_output=True, text=True, check=True).stdout)
        pages = write_pages(folder, args.arch, args.model, before)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            for name, path in pages.items():
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.add_init_script(COUNT_FRAMES)
                page.goto(path.as_uri())
                page.wait_for_timeout(2000)              # the page's start (weights, dots, first frame)
                r = drag(page)
                print(f"{name:6s} {args.model} {args.arch}: {r['ms_per_frame']:.1f} ms/frame "
                      f"({1000 / r['ms_per_frame']:.0f} fps), main thread {r['main_ms']:.1f} ms per frame, "
                      f"{r['frames']} frames in a {MOVES}-move drag, lag after the last move {r['lag_ms']:.0f} ms")
                page.close()
            browser.close()


if __name__ == "__main__":
    main()
