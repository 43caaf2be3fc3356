"""explorer.html against PyTorch: headless Chromium runs the page's JavaScript networks, and their
pixel means must match sigmoid(decode(z)) of the model the page was written from."""
import re

import pytest
import torch

import explorer
import models

TOLERANCE = 5e-3
# (model, arch, hidden_layers, activation): every body and both models, small enough to stay fast
CASES = [("vae", "mlp", 2, "tanh"), ("vae", "conv", 1, "relu"), ("cvae", "mlp", 1, "relu"), ("cvae", "conv", 1, "tanh")]


def element_texts(browser, page, hash_, element_ids):
    """The texts of elements of the page opened at page#hash_ once it has loaded: its inline script
    writes #selftest and #decoded before the load event."""
    context = browser.new_context()
    try:
        tab = context.new_page()
        tab.goto(f"{page.as_uri()}#{hash_}")
        return [tab.text_content(f"#{element_id}") for element_id in element_ids]
    finally:
        context.close()


def tiny_model(model, arch, hidden_layers, activation, latent_dim=3):
    torch.manual_seed(0)
    return models.build_model(model, arch, latent_dim, 24, hidden_layers, activation, conv_channels=(4, 6, 6)).eval()


def write_page(net, tmp_path):
    torch.manual_seed(1)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    metrics = {"test_neg_elbo": 100.0, "test_recon": 90.0, "test_kl": 10.0, "active_units": 2}
    kl = [0.2, 1.5, 0.7][:net.latent_dim]
    return explorer.write_explorer(net, x, y, metrics, tmp_path / "explorer.html", kl, pictures=["samples.png"])


def selftest_error(text):
    found = re.fullmatch(r"selftest: (pass|fail) max_abs_err=(\S+) .*", text)
    assert found, text
    return found.group(1), float(found.group(2))


@pytest.mark.parametrize("model,arch,hidden_layers,activation", CASES)
def test_page_passes_selftest_and_decodes_z_as_pytorch(model, arch, hidden_layers, activation, tmp_path, browser):
    net = tiny_model(model, arch, hidden_layers, activation)
    page = write_page(net, tmp_path)
    z, label = torch.tensor([[0.7, -1.3, 2.1]]), 3
    hash_ = "selftest&z=" + ",".join(f"{v:.6f}" for v in z[0].tolist()) + (f"&y={label}" if model == "cvae" else "")
    selftest, decoded = element_texts(browser, page, hash_, ["selftest", "decoded"])
    verdict, err = selftest_error(selftest)
    assert verdict == "pass" and err < TOLERANCE
    means = torch.tensor([float(v) for v in decoded.split(",")])
    with torch.no_grad():       # the float32 model: the page's float16 weights are part of what is checked
        expected = torch.sigmoid(net.decode(z, torch.tensor([label]) if model == "cvae" else None)).flatten()
    assert means.shape == (784,)
    assert (means - expected).abs().max() < TOLERANCE


def test_corrupted_weights_fail_the_selftest(tmp_path, browser):
    page = write_page(tiny_model("cvae", "mlp", 1, "relu"), tmp_path)
    html = page.read_text()
    start = html.index('"base64":"') + len('"base64":"')
    end = html.index('"', start)
    # swap base64 digits in a stretch of the encoder's weights and one of the decoder's: still valid
    # base64, but other float16 values
    swap = str.maketrans("ABCDEFGHabcdefgh", "hgfedcbaHGFEDCBA")
    for i in (start + 2000, end - 2400):
        html = html[:i] + html[i:i + 400].translate(swap) + html[i + 400:]
    page.write_text(html)
    verdict, err = selftest_error(element_texts(browser, page, "selftest", ["selftest"])[0])
    assert verdict == "fail" and not err < TOLERANCE


def test_page_is_written_atomically_and_self_contained(tmp_path):
    page = write_page(tiny_model("vae", "mlp", 1, "relu"), tmp_path)
    html = page.read_text()
    assert not (tmp_path / "explorer.html.tmp").exists()
    assert "/*PAYLOAD*/" not in html and '"float16"' in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)     # nothing fetched from a network
