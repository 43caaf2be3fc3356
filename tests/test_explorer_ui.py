"""explorer.html driven as a person drives it: mouse, keyboard and touch through Playwright on the
system Chromium, axe-core's accessibility rules, a phone's viewport. The pages are written from
tiny untrained models (tests/test_explorer.py's); what is checked is the page's behaviour."""
import itertools
import re

import numpy as np
import pytest
import torch

import explorer
from test_explorer import tiny_model, write_page

pytest.importorskip("playwright.sync_api", reason="pip install playwright")
# The 784 pixel means a canvas shows, read back at the centre of each of its 28 x 28 cells.
READ_CANVAS = """([id, x0, size]) => {
  const c = document.getElementById(id), s = size / 28, d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const out = [];
  for (let r = 0; r < 28; r++) for (let q = 0; q < 28; q++) {
    const i = 4 * (Math.floor((r + 0.5) * s) * c.width + Math.floor(x0 + (q + 0.5) * s));
    out.push(1 - d[i] / 255);
  }
  return out;
}"""
TWO_FRAMES = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The pages of a tiny MLP VAE and a tiny MLP CVAE (latent 3)."""
    folder = tmp_path_factory.mktemp("pages")
    out = {}
    for model in ("vae", "cvae"):
        (folder / model).mkdir()
        out[model] = write_page(tiny_model(model, "mlp", 1, "relu"), folder / model)
    return out


def open_page(browser, page_path, hash_="", **context):
    page = browser.new_context(**context).new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(page_path.as_uri() + hash_)
    page.wait_for_function("document.getElementById('readout').textContent.length > 0")
    return page


def canvas(page, element_id, x0=0, size=None):
    size = size or page.evaluate(f"document.getElementById('{element_id}').height")
    page.evaluate(TWO_FRAMES)
    return np.array(page.evaluate(READ_CANVAS, [element_id, x0, size]))


def centre(page, element_id):
    box = page.locator(f"#{element_id}").bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def test_arrow_keys_move_z_and_the_decoded_image_follows(browser, pages):
    page = open_page(browser, pages["vae"])
    before, lim = canvas(page, "big"), page.evaluate("LIM")
    page.focus("#plane")
    for _ in range(6):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+ArrowUp")
    after = canvas(page, "big")
    dx, dy = page.evaluate("[DX, DY]")
    readout = page.text_content("#readout")
    assert f"z_{dx + 1} = {6 * lim / 40:.2f}" in readout and f"z_{dy + 1} = {5 * lim / 40:.2f}" in readout
    assert np.abs(after - before).max() > 0.01
    assert "nearest test digit" in page.text_content("#status")            # announced to a screen reader
    page.wait_for_function("location.hash.includes('z=')")                 # and kept in the URL
    assert page.errors == []


def test_a_pick_ends_the_pick_mode(browser, pages):
    page = open_page(browser, pages["vae"])
    page.click("button[data-mode=A]")
    assert page.get_attribute("button[data-mode=A]", "aria-pressed") == "true"
    x, y = centre(page, "plane")
    page.mouse.click(x + 30, y - 20)
    assert page.get_attribute("button[data-mode=A]", "aria-pressed") == "false"
    assert page.get_attribute("button[data-mode=decode]", "aria-pressed") == "true"
    picked = page.evaluate("STATE.a")
    page.mouse.move(x - 60, y + 40)                                        # the next drag decodes
    page.mouse.down(); page.mouse.move(x - 80, y + 60); page.mouse.up()
    assert page.evaluate("STATE.a") == picked
    assert page.text_content("#status").startswith(f"A = test digit #{picked}")


def test_keyboard_picks_a_digit_and_escape_leaves_the_mode(browser, pages):
    page = open_page(browser, pages["vae"])
    page.click("button[data-mode=B]")
    page.focus("#plane")
    page.keyboard.press("Escape")
    assert page.get_attribute("button[data-mode=B]", "aria-pressed") == "false"
    page.click("button[data-mode=B]")
    page.focus("#plane")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("Enter")
    nearest = page.evaluate("nearestPoint(STATE.z[DX], STATE.z[DY])")
    assert page.evaluate("STATE.b") == nearest
    assert page.get_attribute("button[data-mode=decode]", "aria-pressed") == "true"


def test_a_right_click_does_not_decode(browser, pages):
    page = open_page(browser, pages["vae"])
    x, y = centre(page, "plane")
    page.mouse.move(x + 50, y + 50)
    page.mouse.move(x + 300, y + 300)                                      # off the plane: no hover
    before = page.evaluate("STATE.z.slice()")
    page.mouse.click(x + 50, y + 50, button="right")
    assert page.evaluate("STATE.z.slice()") == before
    page.mouse.click(x + 50, y + 50)                                       # a left click does
    assert page.evaluate("STATE.z.slice()") != before


def test_a_drag_off_the_plane_stops_at_its_edge(browser, pages):
    page = open_page(browser, pages["vae"])
    x, y = centre(page, "plane")
    page.mouse.move(x, y); page.mouse.down()
    page.mouse.move(x + 2000, y - 2000, steps=3); page.mouse.up()
    zx, zy, lim = page.evaluate("[STATE.z[DX], STATE.z[DY], LIM]")
    assert zx == pytest.approx(lim) and zy == pytest.approx(lim)


def test_hover_decodes_and_shows_the_digit_under_the_mouse(browser, pages):
    page = open_page(browser, pages["vae"])
    before = canvas(page, "big")
    px, py, width = page.evaluate("[...toPlane(MU[DX], MU[DY]), document.getElementById('plane').width]")
    box = page.locator("#plane").bounding_box()
    page.mouse.move(box["x"] + px * box["width"] / width, box["y"] + py * box["height"] / width)
    page.wait_for_function("!document.getElementById('thumb').hidden")
    assert page.text_content("#thumb-label") == f"#0: a {page.evaluate('LABELS[0]')}"
    assert page.text_content("#readout").startswith("hover")
    assert np.abs(canvas(page, "big") - before).max() > 0.01
    assert page.evaluate("STATE.z.every(v => v === 0)")                    # hovering keeps nothing


def test_bad_hash_values_are_rejected_with_a_message_and_a_new_hash_applies(browser, pages):
    page = open_page(browser, pages["cvae"], "#a=99999&drag=foo&y=12&t=2")
    note = page.text_content("#hash-note")
    assert page.is_visible("#hash-note")
    for bad in ("#a=99999", "#drag=foo", "#y=12", "#t=2"):
        assert bad in note
    assert page.evaluate("[STATE.a, STATE.y]") == [0, 0] and page.errors == []
    page.evaluate("location.hash = '#z=0.5,-0.25,1&y=4'")
    page.wait_for_function("document.getElementById('decoded').textContent.split(',').length === 784")
    assert page.evaluate("[STATE.z, STATE.y]") == [[0.5, -0.25, 1], 4]
    assert page.is_hidden("#hash-note")


def draw_zero(page, cx, cy, rx, ry):
    """An ellipse drawn with the mouse on the pad, centred at (cx, cy) in the pad's 28 x 28 units."""
    page.locator("#pad").scroll_into_view_if_needed()
    box = page.locator("#pad").bounding_box()
    to = lambda u, v: (box["x"] + u * box["width"] / 28, box["y"] + v * box["height"] / 28)
    points = [to(cx + rx * np.sin(a), cy - ry * np.cos(a)) for a in np.linspace(0, 2 * np.pi + 0.3, 24)]
    page.mouse.move(*points[0]); page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*p)
    page.mouse.up()


def test_a_drawing_is_normalised_as_mnist_digits_were(browser, pages):
    page = open_page(browser, pages["vae"])
    draw_zero(page, 6, 7, 2, 3)                                            # small, in the top left corner
    small = canvas(page, "normalised").reshape(28, 28)
    page.click("#clear")
    draw_zero(page, 15, 14, 6, 9)                                          # large, near the centre
    large = canvas(page, "normalised").reshape(28, 28)
    for image in (small, large):
        rows, cols = np.nonzero(image > 0.05)
        assert rows.max() - rows.min() < 22 and cols.max() - cols.min() < 22   # a 20 x 20 box, anti-aliased
        grid = np.arange(28) + 0.5
        com = ((image.sum(1) * grid).sum() / image.sum(), (image.sum(0) * grid).sum() / image.sum())
        assert np.allclose(com, (14, 14), atol=0.5)
    assert np.abs(small - large).mean() < 0.05                             # the same digit, wherever drawn
    assert canvas(page, "recon").max() > 0                                 # its reconstruction beside it


def test_the_pad_draws_by_keyboard(browser, pages):
    page = open_page(browser, pages["vae"])
    page.focus("#pad")
    page.keyboard.press("Space")
    for key in ["ArrowRight"] * 4 + ["ArrowDown"] * 6:
        page.keyboard.press(key)
    page.keyboard.press("Space")
    assert canvas(page, "normalised").max() > 0.5
    assert page.evaluate("STATE.drawnMu !== null")
    page.keyboard.press("Delete")
    assert canvas(page, "normalised").max() == 0


def test_cvae_interpolation_decodes_each_end_with_its_own_label(browser, pages):
    page = open_page(browser, pages["cvae"], "#t=0.3")
    assert page.text_content("#t-label") == "t = 0.30" and page.text_content("#t-off") == ""
    a, b = page.evaluate("[STATE.a, STATE.b]")
    mu_a, mu_b, ya, yb = page.evaluate(f"[muOf({a}), muOf({b}), +LABELS[{a}], +LABELS[{b}]]")
    assert ya != yb
    page.wait_for_function("LAZY.busy === null && Object.keys(LAZY.want).length === 0")
    net = tiny_model("cvae", "mlp", 1, "relu")
    with torch.no_grad():
        expected = torch.sigmoid(net.decode(torch.tensor([mu_a, mu_b]), torch.tensor([ya, yb]))).flatten(1).numpy()
    for k, want in ((0, expected[0]), (9, expected[1])):
        assert np.abs(canvas(page, "strip", 56 * k, 56) - want).max() < 1 / 255 + 5e-3
    page.focus("#plane")
    page.keyboard.press("ArrowUp")                                         # z leaves the line: t says so
    page.wait_for_function("document.getElementById('t-off').textContent === 'off the line'")


def test_axe_finds_no_critical_or_serious_violation(browser, pages):
    from axe_playwright_python.sync_playwright import Axe
    for model in ("vae", "cvae"):
        page = open_page(browser, pages[model], "#demo=draw")
        results = Axe().run(page)
        bad = [(v["id"], v["impact"]) for v in results.response["violations"] if v["impact"] in ("critical", "serious")]
        assert bad == [], f"{model}: {bad}"


def test_on_a_phone_the_plane_and_the_decoded_image_fit_together_and_touch_works(browser, pages):
    page = open_page(browser, pages["cvae"], viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    for element_id in ("plane", "big"):
        box = page.locator(f"#{element_id}").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844
    cdp = page.context.new_cdp_session(page)

    def touch_drag(element_id, path):
        page.locator(f"#{element_id}").scroll_into_view_if_needed()
        box = page.locator(f"#{element_id}").bounding_box()
        points = [{"x": box["x"] + u * box["width"], "y": box["y"] + v * box["height"]} for u, v in path]
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [points[0]]})
        for p in points[1:]:
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [p]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})

    touch_drag("plane", [(0.5, 0.5), (0.6, 0.45), (0.7, 0.4)])
    zx, zy, lim = page.evaluate("[STATE.z[DX], STATE.z[DY], LIM]")
    assert zx == pytest.approx(0.4 * lim, abs=0.02 * lim) and zy == pytest.approx(0.2 * lim, abs=0.02 * lim)
    touch_drag("pad", [(0.3 + 0.4 * s, 0.2 + 0.6 * s) for s in np.linspace(0, 1, 8)])
    assert canvas(page, "normalised").max() > 0.5 and page.errors == []


# Machado, Oliveira & Fernandes (2009) at severity 1: linear RGB -> the colours a reader with
# protanopia, deuteranopia or tritanopia sees.
CVD = {"protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
       "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
       "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]]}


def linear_rgb(hex_colour):
    c = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def cielab(rgb):
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ np.clip(rgb, 0, 1)
    f = np.cbrt(xyz / [0.95047, 1, 1.08883])
    f = np.where(xyz / [0.95047, 1, 1.08883] > 0.008856, f, 7.787 * xyz / [0.95047, 1, 1.08883] + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_dot_colours_keep_3_to_1_contrast_and_stay_apart_for_colour_blind_readers():
    colours = re.findall(r'"(#[0-9A-F]{6})"', re.search(r"const COLORS = \[(.*?)\]", explorer.TEMPLATE.read_text()).group(1))
    assert len(colours) == 10
    for c in colours:        # WCAG contrast with the white plane: (L_white + 0.05) / (L + 0.05)
        assert 1.05 / (linear_rgb(c) @ [0.2126, 0.7152, 0.0722] + 0.05) >= 3, c
    for name, matrix in [("normal", np.eye(3)), *CVD.items()]:
        labs = [cielab(np.array(matrix) @ linear_rgb(c)) for c in colours]
        closest = min(np.linalg.norm(p - q) for p, q in itertools.combinations(labs, 2))
        assert closest > 20, f"{name}: two classes {closest:.1f} apart in CIELAB"
