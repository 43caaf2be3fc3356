"""explorer.html: one self-contained page per trained model, to explore its latent space offline.

The page holds the model's weights and runs its encoder and decoder in plain JavaScript (the
networks of models.py written out layer by layer: Linear, ReLU/tanh, Conv2d, ConvTranspose2d), so
it opens from disk in any current browser with no server, no download and no CDN. It shows the
posterior means of a few thousand test digits on the plane of the two most informative latent
dimensions (by KL), decodes any point of that plane live (by mouse, touch or keyboard), moves z
with sliders, draws a digit on a pad and encodes it after normalising it as MNIST's digits were,
interpolates between two test digits and lists the run's metrics (docs/explorer.md). The
template (HTML, CSS, JavaScript) is explorer_template.html, beside this file; this module fills in a JSON
payload.

Weights travel as float16 (little-endian, base64). Rounding the weights to float16 moves the
pixel means σ(logits) by at most 0.0037 and the posterior means μ by at most 0.0028 (500 random
z ~ N(0, I) and 500 test digits, the shipped checkpoints; the trained MLPs of latent 50 move
most, the default 784-400-20 VAE after 100 training batches about 1e-4); each page measures its
own figure on 256 codes and 256 digits and states it. The page's self-test compares its
JavaScript with PyTorch run on the same float16-rounded weights (a check of the JavaScript: 5e-3
on pixel means and on μ; the errors seen are about 1e-6), and reports the distance to the
float32 model beside it.

Page sizes: the default MLP VAE (784-400-20) 2.0 MB, the default MLP CVAE (latent 2) 1.85 MB, the
default conv VAE (channels 32-64-128, 500 units, latent 20: 6.5 million weights) 17.7 MB; the
shipped checkpoints 1.6 MB (the MLPs of 2 x 200 units, latent 50) and 5.0 MB (the conv VAE with
channels 32-64 and 256 units); the 2,500 test digits as a PNG (the thumbnails on the plane) add
about 0.6 MB to each.

Hash parameters the page reads (for tests and demonstrations):
  #selftest           decode the embedded codes and encode the embedded digits, compare with PyTorch
  #z=z1,z2,...&y=d    decode that code (CVAE: with label d); the 784 pixel means go into #decoded
                      (the page writes its own state back as #z=...&y=...&a=...&b=..., and names
                      any value it cannot use in a message)
  #a=i&b=j&t=0.5      interpolate between embedded test digits i and j, z at fraction t
  #demo=draw          draw a "0" on the pad with synthetic pointer events (the pad's own handlers)
  #drag=zx,zy         drag on the latent plane from the origin to (zx, zy), also with pointer events
"""
import base64
import copy
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import runs
from models import CVAE
from data import seeded

TEMPLATE = Path(__file__).resolve().parent / "explorer_template.html"
N_POINTS = 2500        # test digits on the latent plane
SPRITE_COLUMNS = 50    # the plane's test digits travel as one PNG, 50 digits to a row
N_CHECK_CODES = 6      # z the self-test decodes (CVAE: each with its own label)
N_CHECK_IMAGES = 4     # test digits the self-test encodes
N_FLOAT16 = 256        # codes and test digits on which the float16 rounding is measured
METRIC_KEYS = ("epoch", "test_neg_elbo", "test_recon", "test_kl", "iw_samples", "test_nll",
               "test_bits_per_dim", "active_units", "sample_accuracy")


def b64(array, dtype):
    """base64 of the array's bytes, little-endian, row-major."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def rounded_to_float16(net):
    """A copy of net whose weights are exactly what the page holds: float16 values, run in float32."""
    net16 = copy.deepcopy(net).float()
    with torch.no_grad():
        for p in net16.parameters():
            p.copy_(p.half().float())
    return net16


def weights_payload(net):
    """Every tensor of the state dict, float16, in one base64 string; the names say which layer.
    Conv weights are stored channels-last in memory (models.build_model): .contiguous() gives the
    (out, in, kh, kw) order (ConvTranspose2d: (in, out, kh, kw)) that the page indexes."""
    tensors, parts, offset = [], [], 0
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        parts.append(t.half().numpy().reshape(-1))
        tensors.append({"name": name, "shape": list(t.shape), "offset": offset})
        offset += t.numel()
    return {"dtype": "float16", "tensors": tensors, "base64": b64(np.concatenate(parts), "<f2")}


def model_spec(net):
    """What the page needs to rebuild the networks of models.py."""
    conditional = isinstance(net, CVAE)
    return {"kind": "cvae" if conditional else "vae", "arch": net.arch, "latent_dim": net.latent_dim,
            "hidden_dim": net.hidden_dim, "hidden_layers": net.hidden_layers, "activation": net.activation,
            "channels": list(net.conv_channels or []), "n_classes": net.n_classes if conditional else 0}


@torch.no_grad()
def latent_points(net, x, y, seed):
    """The posterior means μ of q(z|x) (CVAE: q(z|x, y), with the true label) of N_POINTS test digits,
    all latent dimensions (float16), and their labels as a string of digits."""
    with seeded(torch.device("cpu"), seed):
        idx = torch.randperm(len(x))[:N_POINTS]
    mu = posterior_means(net, x[idx], y[idx])
    return {"n": len(idx), "mu": b64(mu.numpy(), "<f2"), "labels": "".join(str(int(d)) for d in y[idx]),
            "sprite": sprite_png(x[idx]), "sprite_columns": SPRITE_COLUMNS}


def sprite_png(x):
    """The digits x (n, 1, 28, 28) as one greyscale PNG, SPRITE_COLUMNS to a row, dark ink on white,
    as a data: URL: the page shows the digit under the mouse from it."""
    n, rows = len(x), -(-len(x) // SPRITE_COLUMNS)
    ink = np.full((rows * SPRITE_COLUMNS, 28, 28), 255, np.uint8)
    ink[:n] = 255 - (x.reshape(n, 28, 28).numpy() * 255).round().astype(np.uint8)
    sheet = ink.reshape(rows, SPRITE_COLUMNS, 28, 28).transpose(0, 2, 1, 3).reshape(rows * 28, SPRITE_COLUMNS * 28)
    buffer = io.BytesIO()
    Image.fromarray(sheet, "L").save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pixel_means(net, z, y):
    return torch.sigmoid(net.decode(z, y)).flatten(1)       # σ(logits), (n, 784); the VAE ignores y


def posterior_means(net, x, y):
    return net.encode(x, y)[0]                              # μ of q(z|x) (CVAE: q(z|x, y)), (n, latent_dim)


def as_list(t):
    return np.round(t.numpy().astype(float), 7).tolist()


def derived_seed(seed, k):
    """The k-th seed after `seed`, still in torch.manual_seed's range [0, 2^64)."""
    return (seed + k) % 2 ** 64


@torch.no_grad()
def self_test_cases(net, net16, x, y, seed):
    """Codes and digits with PyTorch's answers on the page's own (float16) weights, and the same
    computed by the float32 model, so the page can state what the float16 rounding costs."""
    with seeded(torch.device("cpu"), derived_seed(seed, 1)):
        z = torch.randn(N_CHECK_CODES, net.latent_dim)
        z_labels = torch.randint(0, 10, (N_CHECK_CODES,))
        idx = torch.randperm(len(x))[:N_CHECK_IMAGES]
    pixels = (x[idx] * 255).round()                 # the page holds the digits as bytes
    images, labels = pixels / 255, y[idx]
    return {"z": as_list(z), "z_labels": z_labels.tolist(),
            "means": as_list(pixel_means(net16, z, z_labels)), "means_float32": as_list(pixel_means(net, z, z_labels)),
            "images": b64(pixels.flatten(1).numpy(), "u1"), "image_labels": labels.tolist(),
            "mu": as_list(posterior_means(net16, images, labels)),
            "mu_float32": as_list(posterior_means(net, images, labels))}


@torch.no_grad()
def float16_error(net, net16, x, y, seed):
    """The largest change float16 weights make to the pixel means (N_FLOAT16 codes z ~ N(0, I)) and
    to the posterior means μ (N_FLOAT16 test digits)."""
    with seeded(torch.device("cpu"), derived_seed(seed, 2)):
        z = torch.randn(N_FLOAT16, net.latent_dim)
        z_labels = torch.randint(0, 10, (N_FLOAT16,))
        idx = torch.randperm(len(x))[:N_FLOAT16]
    pixels = (pixel_means(net, z, z_labels) - pixel_means(net16, z, z_labels)).abs().max()
    mu = (posterior_means(net, x[idx], y[idx]) - posterior_means(net16, x[idx], y[idx])).abs().max()
    return {"pixel_means": pixels.item(), "mu": mu.item(), "n_codes": N_FLOAT16, "n_digits": len(idx)}


def page_payload(net, x, y, metrics, kl_per_dim, pictures, seed):
    """Everything the page shows, as plain JSON values (a CPU float32 copy of net does the work)."""
    net = copy.deepcopy(net).cpu().float().eval()
    x, y = x.detach().cpu().float(), y.detach().cpu()
    net16 = rounded_to_float16(net)
    return {"model": model_spec(net), "weights": weights_payload(net),
            "points": latent_points(net, x, y, seed), "kl_per_dim": [float(k) for k in kl_per_dim],
            "metrics": {k: metrics[k] for k in METRIC_KEYS if k in metrics},
            "pictures": [str(p) for p in pictures], "check": self_test_cases(net, net16, x, y, seed),
            "float16_error": float16_error(net, net16, x, y, seed)}


def fill_template(payload, template_path=TEMPLATE):
    """The template with the payload in its script tag ("</" escaped so no string can close the tag)."""
    text = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    template = Path(template_path).read_text(encoding="utf-8")
    assert template.count("/*PAYLOAD*/null") == 1, "the template's payload placeholder is missing"
    return template.replace("/*PAYLOAD*/null", text)


def write_explorer(net, x_test, y_test, metrics, path, kl_per_dim, pictures=(), seed=0):
    """Write the explorer page of `net` to `path` atomically (a reader never sees half a page).
    x_test (n, 1, 28, 28) in [0, 1], y_test (n,) labels; metrics: the run's final report;
    pictures: names of PNG files beside `path` to link to."""
    page = fill_template(page_payload(net, x_test, y_test, metrics, kl_per_dim, pictures, seed))
    runs.save_atomic(lambda p: p.write_text(page, encoding="utf-8"), path)
    return Path(path)
