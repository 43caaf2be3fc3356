"""A small 0 drawn in a corner of explorer.html's pad, read back: the page's reconstruction of the
drawing is handed to judge.py's digit classifier (the one that judges the CVAE's samples).

Writes the page of a trained VAE (a checkpoint of main.py) with the current template and with
another one (by default the main branch's, `git show main:assets/explorer_template.html`), draws
the same small ellipse in the top-left corner of each pad with the mouse, through Playwright on
the system Chromium, and prints the classifier's reading of each reconstruction, with screenshots
of the pads written to --shots.

    python benchmarks/explorer_drawing.py RUN/best.pt [--before PATH] [--shots DIR]
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import explorer  # noqa: E402
import judge  # noqa: E402
import models  # noqa: E402
from explorer_speed import CHROMIUM_ARGS  # noqa: E402

READ_RECON = """() => {
  const c = document.getElementById("recon"), s = c.width / 28, d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const out = [];
  for (let r = 0; r < 28; r++) for (let q = 0; q < 28; q++) out.push(1 - d[4 * (Math.floor((r + 0.5) * s) * c.width + Math.floor((q + 0.5) * s))] / 255);
  return out;
}"""


def draw_small_zero(page):
    """An ellipse 4 x 6 pad pixels (of 28) centred at (6, 7): a 0 a fifth of MNIST's size, off-centre."""
    page.locator("#pad").scroll_into_view_if_needed()
    box = page.locator("#pad").bounding_box()
    points = [(box["x"] + (6 + 2 * np.sin(a)) * box["width"] / 28, box["y"] + (7 - 3 * np.cos(a)) * box["height"] / 28)
              for a in np.linspace(0, 2 * np.pi + 0.3, 40)]
    page.mouse.move(*points[0]); page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*p)
    page.mouse.up()
    page.wait_for_timeout(300)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--before", help="the template to compare with (default: the main branch's)")
    parser.add_argument("--shots", default=".", help="folder for the screenshots of the pads")
    args = parser.parse_args()
    net, _ = models.read_checkpoint(args.checkpoint)
    _, (x, y) = data.load_mnist(data.data_path("data"), "cpu")
    classifier, _ = judge.load_classifier("data", "cpu", 0)
    payload = explorer.page_payload(net, x, y, {}, [1.0] * net.latent_dim, (), 1)
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as p:
        before = args.before
        if before is None:
            before = Path(folder) / "main_template.html"
            before.write_text(subprocess.run(["git", "show", "main:assets/explorer_template.html"], cwd=ROOT,
                                             capture_output=True, text=True, check=True).stdout)
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        for name, template in (("before", before), ("after", explorer.TEMPLATE)):
            path = Path(folder) / f"{name}.html"
            path.write_text(explorer.fill_template(payload, template), encoding="utf-8")
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(path.as_uri())
            page.wait_for_timeout(1000)
            draw_small_zero(page)
            recon = torch.tensor(page.evaluate(READ_RECON), dtype=torch.float32).reshape(1, 1, 28, 28)
            with torch.no_grad():
                probs = torch.softmax(classifier(recon), 1)[0]
            shot = Path(args.shots) / f"explorer_drawing_{name}.png"
            page.locator("#pad").locator("xpath=..").screenshot(path=str(shot))
            print(f"{name:6s}: the reconstruction is read as a {probs.argmax().item()} "
                  f"(p = {probs.max().item():.3f}; p(0) = {probs[0].item():.3f}); {shot}")
            page.close()
        browser.close()


if __name__ == "__main__":
    main()
