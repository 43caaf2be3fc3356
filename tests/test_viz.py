"""viz.py: the gallery of figures for the four models, and the computations behind the figures
checked against a second computation or against what they promise (conditioning, clamping)."""
import math

import pytest
import torch
from matplotlib.figure import Figure

import data
import losses
import main
import models
import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALWAYS = {"latent_space.png", "interpolations.png", "traversals.png", "completions.png",
          "anomaly_histogram.png", "least_likely.png"}
OLD_HISTORY = [{"epoch": e, "train_neg_elbo": 200.0 - e, "test_neg_elbo": 190.0 - e,
                "test_recon": 170.0 - e, "test_kl": 20.0} for e in (1, 2, 3)]
HISTORY = [{**h, "train_recon": 178.0 - h["epoch"], "train_kl": 22.0} for h in OLD_HISTORY]


def small_model(kind, arch, latent_dim):
    torch.manual_seed(0)
    return models.build_model(kind, arch, latent_dim=latent_dim, hidden_dim=16).eval()


def fake_test_set(n=64):
    """n random images; labels cycle 0-9 so every class is there."""
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return x, torch.arange(n) % 10


def is_png(path):
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 500


@pytest.mark.parametrize("kind,arch,latent_dim,history", [   # both conv models: tests/test_cli.py
    ("vae", "mlp", 2, HISTORY), ("vae", "mlp", 3, []), ("cvae", "mlp", 3, OLD_HISTORY)])
def test_gallery_writes_every_figure_that_applies(tmp_path, monkeypatch, kind, arch, latent_dim, history):
    """Which figures apply, each built in full; encoding them as PNG (seconds of matplotlib) is
    checked where a run draws its pictures, once for each model kind (tests/test_cli.py)."""
    def unrendered(fig, path):
        assert isinstance(fig, Figure) and fig.axes
        path.touch()
    monkeypatch.setattr(viz, "save_figure", unrendered)
    net = small_model(kind, arch, latent_dim)
    x, y = fake_test_set()
    rng_before = torch.random.get_rng_state()
    kl_per_dim = main.latent_diagnostics(net, x, y)["kl_per_dim"]
    scores = main.evaluate(net, x, y, seed=1)[1]
    paths = viz.gallery(net, x, y, history, tmp_path, 1, kl_per_dim, scores)
    expected = set(ALWAYS)
    expected |= {"manifold.png"} if latent_dim == 2 else set()
    expected |= {"analogies.png"} if kind == "cvae" else set()
    expected |= {"loss_curves.png"} if history else set()
    assert sorted(p.name for p in paths) == sorted(expected)
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert torch.equal(torch.random.get_rng_state(), rng_before)     # figures never shift training's RNG


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_analogy_images_decode_each_style_with_every_label(arch):
    net = small_model("cvae", arch, latent_dim=3)
    x, y = fake_test_set(4)
    images = viz.analogy_images(net, x, y)
    assert images.shape == (4, 10, 1, 28, 28)
    # the label conditions: one z decoded with two different labels gives two different images
    for a in range(10):
        for b in range(a + 1, 10):
            assert (images[:, a] - images[:, b]).abs().flatten(1).amax(1).min() > 1e-4
    # column d is p(x|y = d, z_i) with z_i the mean of q(z|x_i, y_i): the same decoding, one at a time
    mu, _ = net.encode(x, y)
    for i in range(4):
        for d in (0, 7):
            expected = torch.sigmoid(net.decode(mu[i:i + 1], torch.tensor([d])))[0]
            torch.testing.assert_close(images[i, d], expected)


@pytest.mark.parametrize("kind,arch", [("vae", "mlp"), ("cvae", "mlp"), ("cvae", "conv")])
def test_completion_keeps_the_observed_pixels_and_fills_the_hidden_ones(kind, arch):
    net = small_model(kind, arch, latent_dim=3)
    x, y = fake_test_set(6)
    hidden = viz.bottom_half_hidden(x)
    assert hidden.sum() == 6 * 14 * 28 and hidden[..., 14:, :].all()
    encode, decode = (lambda v: net.encode(v, y)), (lambda z: net.decode(z, y))
    chains = {}
    for start, pixels in (("noise", "means"), ("zeros", "samples")):
        for run in (0, 1):
            with data.seeded(torch.device("cpu"), 0):
                chains[start, pixels, run] = viz.complete(encode, decode, x, hidden, 5, start, pixels)
    for (start, pixels, run), filled in chains.items():
        assert torch.equal(filled[~hidden], x[~hidden])         # observed pixels exactly as given
        assert not torch.equal(filled[hidden], x[hidden])       # hidden ones replaced
        assert torch.equal(filled, chains[start, pixels, 1 - run])      # seeded: reproducible
    means, samples = chains["noise", "means", 0][hidden], chains["zeros", "samples", 0][hidden]
    assert ((means > 0) & (means < 1)).all()                    # σ(logits): pixel means
    assert ((samples == 0) | (samples == 1)).all()              # Bernoulli draws


def test_the_chain_at_z_mu_converges_to_the_fixed_point_of_the_decoder_means():
    """With σ = 0 (z = μ) and pixel means, the chain is the iteration x̂_h ← σ(l(μ(x_o, x̂_h))). On a
    two-pixel toy, μ = 0.8 x_o + x̂_h − 0.5 and l(z) = (2z, z + 0.3), the map has slope at most ¼:
    40 steps reach its fixed point, found a second way by bisection."""
    x = torch.tensor([[0.0, 0.3], [1.0, 0.9], [0.4, 0.0]])           # 3 images of 2 pixels, the second hidden
    hidden = torch.tensor([[False, True]] * 3)
    encode = lambda v: (0.8 * v[:, :1] + v[:, 1:] - 0.5, torch.full((len(v), 1), -math.inf))   # noqa: E731
    decode = lambda z: torch.cat([2 * z, z + 0.3], dim=1)                                   # noqa: E731
    filled = viz.complete(encode, decode, x.double(), hidden, steps=40, start="zeros")
    assert torch.equal(filled[:, 0], x[:, 0].double())                 # the observed pixel as given
    for x_o, h in zip(x[:, 0].tolist(), filled[:, 1].tolist()):
        lo, hi = 0.0, 1.0                  # σ(0.8 x_o + h − 0.2) − h falls from > 0 at 0 to < 0 at 1
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if 1 / (1 + math.exp(-(0.8 * x_o + mid - 0.2))) > mid else (lo, mid)
        assert h == pytest.approx(lo, abs=1e-9)


def test_latent_scatter_runs_in_two_dims_and_with_pca(tmp_path):
    x, y = fake_test_set()
    for latent_dim in (1, 2, 5):
        net = small_model("vae", "mlp", latent_dim)
        viz.latent_space(net, x, y, tmp_path / f"latent_{latent_dim}.png")
        assert is_png(tmp_path / f"latent_{latent_dim}.png")


def test_projection_is_z_in_two_dims_and_the_top_principal_components_otherwise():
    labels = torch.arange(500) % 10
    mu2 = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    coords, names = viz.project_2d(mu2, labels, "E[z|x]")
    assert torch.equal(coords, mu2) and names == ("z_1 = E[z|x]_1", "z_2 = E[z|x]_2")
    # in 5 dims, the variances of the two coordinates are the two largest eigenvalues of the
    # means' covariance matrix, and the coordinates are uncorrelated
    mu = torch.randn(500, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mu = mu * torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1], dtype=torch.float64)
    coords, names = viz.project_2d(mu, labels, "E[z|x]")
    eigenvalues = torch.linalg.eigvalsh(torch.cov(mu.T)).flip(0)
    torch.testing.assert_close(torch.cov(coords.T), torch.diag(eigenvalues[:2]))
    assert names[0].startswith("PC 1 of E[z|x]") and names[1].startswith("PC 2 of E[z|x]")


def test_manifold_grid_is_the_inverse_gaussian_cdf_of_a_uniform_grid():
    u = torch.linspace(0.05, 0.95, 20)
    z = viz.gaussian_grid(20)
    torch.testing.assert_close(z, 2 ** 0.5 * torch.erfinv(2 * u - 1))     # Φ⁻¹(u) = √2 erf⁻¹(2u − 1)
    torch.testing.assert_close(z, -z.flip(0))


def test_kl_per_dimension_sums_to_the_kl():
    net = small_model("vae", "mlp", latent_dim=4)
    x, y = fake_test_set()
    mu, logvar = net.encode(x)
    per_dim = torch.tensor(main.latent_diagnostics(net, x, y)["kl_per_dim"])
    assert per_dim.shape == (4,) and (per_dim >= 0).all()
    torch.testing.assert_close(per_dim.sum(), losses.kl_to_standard_normal(mu, logvar).mean())


def test_traversals_order_their_rows_by_the_kl_they_are_given(tmp_path, monkeypatch):
    """One KL per dimension: the traversal rows follow the numbers kl_per_dim.png draws."""
    net = small_model("vae", "mlp", latent_dim=4)
    x, y = fake_test_set()
    drawn = []
    monkeypatch.setattr(viz, "traversal_images", lambda net, x, y, dims, offsets: drawn.append(dims.tolist())
                        or torch.zeros(len(dims) * len(offsets), 1, 28, 28))
    viz.latent_traversals(net, x, y, tmp_path / "t.png", [0.5, 3.0, 0.0, 1.0], n_digits=1)
    assert drawn == [[1, 3, 0, 2]]


def test_loss_curves_with_and_without_the_train_terms(tmp_path):
    with_val = [{**h, "val_neg_elbo": 1.0, "val_recon": 0.5, "val_kl": 0.5} for h in HISTORY]
    for name, history in (("old", OLD_HISTORY), ("new", HISTORY), ("val", with_val), ("one", HISTORY[:1])):
        viz.loss_curves(history, tmp_path / f"{name}.png", "VAE (mlp), MNIST")
        assert is_png(tmp_path / f"{name}.png")
    # the CVAE's panels name its own distributions, which condition on y
    vae, cvae = (dict(viz.term_names(conditional)) for conditional in (False, True))
    assert "p(x|z)" in vae["recon"] and "q(z|x)" in vae["kl"]
    assert "p(x|y, z)" in cvae["recon"] and "q(z|x, y)" in cvae["kl"]


def test_the_final_report_honours_max_batches_and_hands_the_gallery_every_image(monkeypatch):
    """The report's mean over the first --max-batches batches is the mean of the first images' scores
    (the same draws), and the gallery's scores cover the whole test set."""
    monkeypatch.setattr(data, "EVAL_BATCH_SIZE", 16)
    net = small_model("vae", "mlp", latent_dim=3)
    x, y = fake_test_set()                                                   # 64 images: 4 batches of 16
    cfg = main.Config(model="vae", iw_samples=0, max_batches=2, seed=3)
    report, neg_elbo = main.final_report(net, cfg, 1, (x, y))
    assert neg_elbo.shape == (64,)
    assert report["test_neg_elbo"] == pytest.approx(neg_elbo[:32].mean().item(), rel=1e-6)    # 2 of 4 batches
    assert report["test_neg_elbo"] != pytest.approx(neg_elbo.mean().item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_evaluate_and_the_anomaly_scores_are_each_images_elbo_from_the_model(kind):
    net = small_model(kind, "mlp", latent_dim=3)
    x, y = fake_test_set()
    test, scores = main.evaluate(net, x, y, seed=3)
    assert scores.shape == (64,) and (scores > 0).all()
    # a second computation: the ELBO of AEVB Eq. 10 straight from the model, the same z drawn
    with data.seeded(x.device, 3), torch.no_grad():
        elbo, log_px, kl = losses.elbo(x, *net(x, y))
    torch.testing.assert_close(scores, -elbo)
    assert [test["test_neg_elbo"], test["test_recon"], test["test_kl"]] == pytest.approx(
        [-elbo.mean().item(), -log_px.mean().item(), kl.mean().item()], rel=1e-6)
