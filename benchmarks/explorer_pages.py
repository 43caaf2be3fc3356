"""The explorer page of each checkpoint, measured in Chromium: its size, the page's self-test (its
JavaScript networks on the float16 weights against PyTorch on the same weights), and its decoding
of a code against the float32 model.

For each checkpoint, `python main.py --eval CKPT --iw-samples 0` writes the page into a temporary
folder (the page a user's --eval writes); headless Chromium (the system chromium, through
Playwright, as the tests use it) opens it at #selftest&z=... and the script reads #selftest,
#decoded and the float16 error the page states under "Checks" (N_FLOAT16 codes and digits).

    python benchmarks/explorer_pages.py                   # the four shipped checkpoints, about a minute
    python benchmarks/explorer_pages.py RUN/best.pt --json records/explorer-pages/run.json

--json also writes the numbers and this run's provenance (records/explorer-pages/ holds the
published one).
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models    # noqa: E402
import runs      # noqa: E402
from explorer_speed import CHROMIUM_ARGS  # noqa: E402

SHIPPED = [str(ROOT / "checkpoints" / name) for name in
           ("cvae-mlp-default.pt", "vae-mlp-binarized.pt", "cvae-mlp-binarized.pt", "vae-conv-binarized.pt")]


def label(checkpoint):
    """How the record names a checkpoint: its path in the project, else its run folder and name."""
    try:
        return str(checkpoint.relative_to(ROOT))
    except ValueError:
        return f"{checkpoint.parent.name}/{checkpoint.name}"


def written_page(checkpoint, folder):
    """The explorer.html that `python main.py --eval checkpoint` writes (into folder)."""
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--eval", str(checkpoint), "--iw-samples", "0",
                           "--out-dir", str(folder)], cwd=ROOT, capture_output=True, text=True)
    pages = list(Path(folder).rglob("explorer.html"))
    if done.returncode != 0 or not pages:
        last = (done.stderr.strip().splitlines() or ["no explorer.html written"])[-1]
        runs.fail(f"python main.py --eval {checkpoint} failed: {last.removeprefix('error: ')}")
    return pages[0]


def measure(browser, page, checkpoint):
    """The page's size, its self-test line, and its #z= decoding against the float32 model."""
    net, _ = runs.read_checkpoint(checkpoint, "cpu")
    net.eval()
    z = torch.linspace(-1.5, 1.5, net.latent_dim).unsqueeze(0)          # one code, the same for every page
    digit = 3 if isinstance(net, models.CVAE) else None                  # the CVAE's label
    hash_ = "selftest&z=" + ",".join(f"{v:.6f}" for v in z[0].tolist()) + (f"&y={digit}" if digit is not None else "")
    context = browser.new_context()
    try:
        tab = context.new_page()
        tab.goto(f"{page.as_uri()}#{hash_}")
        selftest, decoded = tab.text_content("#selftest") or "", tab.text_content("#decoded") or ""
        float16 = tab.evaluate("PAYLOAD.float16_error")
    finally:
        context.close()
    found = re.fullmatch(r"selftest: (pass|fail) max_abs_err=(\S+) encoder_mu_max_abs_err=(\S+) .*", selftest)
    if not found or not decoded or not float16:
        runs.fail(f"{page}: the page's self-test or #z= decoding did not run ({selftest!r}); "
                  f"is it a page of this project's template?")
    means = torch.tensor([float(v) for v in decoded.split(",")])
    with torch.no_grad():
        expected = torch.sigmoid(net.decode(z, torch.tensor([digit]) if digit is not None else None)).flatten()
    size = page.stat().st_size
    return {"bytes": size, "megabytes": size / 1e6, "selftest": found.group(1), "selftest_max_abs_err": float(found.group(2)),
            "selftest_mu_max_abs_err": float(found.group(3)),
            "decoded_vs_float32_max_abs_err": (means - expected).abs().max().item(),
            "float16_error": float16, "model": {"kind": "cvae" if digit is not None else "vae", "arch": net.arch,
                                                "latent_dim": net.latent_dim}}


def benchmark():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", default=SHIPPED, help="default: the four shipped checkpoints")
    parser.add_argument("--json", help="also write the numbers and this run's provenance here")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        runs.fail("no chromium found: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        runs.fail("playwright is not installed: pip install -r requirements.txt")
    checkpoints = [Path(c).resolve() for c in args.checkpoints]
    missing = [c for c in checkpoints if not c.is_file()]
    if missing:
        runs.fail(f"no checkpoint {missing[0]}: give the path of a checkpoint.pt or best.pt")
    if len({label(c) for c in checkpoints}) < len(checkpoints):
        runs.fail("a checkpoint is named twice: give each once")
    runs.json_target(args.json)
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{version}; page, size, self-test (float16 weights, page vs PyTorch: pixel means / mu), "
          f"#z= vs the float32 model, float16 error (pixel means / mu)")
    report = {"browser": version, "pages": {}}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        for i, checkpoint in enumerate(checkpoints):
            page = written_page(checkpoint, Path(tmp) / str(i))
            out = report["pages"][label(checkpoint)] = measure(browser, page, checkpoint)
            print(f"{label(checkpoint):40s} {out['megabytes']:6.2f} MB  {out['selftest']} "
                  f"{out['selftest_max_abs_err']:.1e} / {out['selftest_mu_max_abs_err']:.1e}  "
                  f"{out['decoded_vs_float32_max_abs_err']:.1e}  {out['float16_error']['pixel_means']:.4f} / "
                  f"{out['float16_error']['mu']:.4f}")
        browser.close()
    if args.json:
        runs.save_json({**report, "provenance": runs.provenance("cpu")}, args.json)


if __name__ == "__main__":
    benchmark()
