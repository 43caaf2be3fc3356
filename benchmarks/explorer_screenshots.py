"""Screenshots of explorer.html pages at a desktop's size (1400 x 1000) and a phone's (390 x 844,
touch), taken in headless Chromium through Playwright once the page's lazy decodings (the row of
ten, the interpolation strip, the grid behind the plane, decoded in a Web Worker) have arrived:
`chromium --screenshot` with a virtual time budget does not wait for the worker.

    python benchmarks/explorer_screenshots.py PAGE.html HASH OUT.png [--phone]
"""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explorer_speed import CHROMIUM_ARGS  # noqa: E402

IDLE = "LAZY.busy === null && Object.keys(LAZY.want).length === 0 && LAZY.timer === null"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page")
    parser.add_argument("hash", help="e.g. demo=draw&y=7 or drag=1.5,-1.0")
    parser.add_argument("out")
    parser.add_argument("--phone", action="store_true", help="390 x 844, a touch screen")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright
    size = {"width": 390, "height": 844} if args.phone else {"width": 1400, "height": 1000}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport=size, is_mobile=args.phone, has_touch=args.phone).new_page()
        page.goto(f"{Path(args.page).resolve().as_uri()}#{args.hash}")
        page.wait_for_timeout(500)
        page.wait_for_function(IDLE, timeout=60000)
        page.wait_for_timeout(300)
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()
