"""Imputation (imputation.py): log p(x_o) against exact enumeration on a model small enough to
sum over every hidden pixel, the mixture estimator against losses.iw_log_px, the quadrants
against Pyro's split, and --impute's refusals of the wrong checkpoint."""
import dataclasses
import itertools
import json
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from conftest import DZ, GRID, TOY_A as A, TOY_B as B, exact_log_p, make_tiny_mnist
import imputation
import losses
import main
import runs
import models

# conftest's 4-pixel model with a 1-d latent: z ~ N(0, 1), p(x_d|z) = Bernoulli(σ(a_d z + b_d)); the
# "encoder" is any Gaussian that depends on x (here a crude linear guess), as a proposal must.
ALL_X = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))          # the 16 images


def decode(z):
    return z * A + B                                                          # (m, 4) logits


def encode(x):
    mu = (x - 0.5) @ torch.tensor([0.8, -0.6, 0.2, 0.4])
    return mu[:, None], torch.full((len(x), 1), math.log(0.5))                # (n, 1) each


def test_the_grid_is_a_distribution_and_log_p_xo_sums_over_the_hidden_pixels():
    log_px = {tuple(x.tolist()): exact_log_p(x, [0, 1, 2, 3]) for x in ALL_X}
    assert sum(math.exp(v) for v in log_px.values()) == pytest.approx(1.0, abs=1e-9)
    for x in ALL_X:      # hidden: pixels 2 and 3. log p(x_o) = log Σ_{x_h} p(x_o, x_h)
        joint = [log_px[(x[0].item(), x[1].item(), h2, h3)] for h2 in (0.0, 1.0) for h3 in (0.0, 1.0)]
        assert exact_log_p(x, [0, 1]) == pytest.approx(torch.logsumexp(torch.tensor(joint, dtype=torch.float64), 0).item(), abs=1e-9)


@pytest.mark.parametrize("hidden_pixels", [[2, 3], [1], [0, 1, 3]])
def test_log_p_xo_and_the_conditional_match_exact_enumeration(hidden_pixels):
    hidden = torch.zeros(4, dtype=torch.bool)
    hidden[hidden_pixels] = True
    observed = [d for d in range(4) if d not in hidden_pixels]
    torch.manual_seed(0)
    estimate = imputation.log_px_observed(ALL_X, hidden, encode, decode, k=20000, n_chains=4, steps=3)
    torch.manual_seed(1)
    log_px = losses.iw_log_px(ALL_X, encode, decode, k=20000)
    for x, est_o, est in zip(ALL_X, estimate, log_px):
        exact_o, exact = exact_log_p(x, observed), exact_log_p(x, [0, 1, 2, 3])
        assert est_o.item() == pytest.approx(exact_o, abs=0.01)
        # −log p(x_h|x_o) = log p(x_o) − log p(x), estimated as the difference of two estimates
        assert (est_o - est).item() == pytest.approx(exact_o - exact, abs=0.02)


def mc_elbo(x_obs, mu, logvar, pixels, n=50000):
    """E_q[log p(x_o|z)] − KL(q || p(z)) of each 1-d Gaussian q, by Monte Carlo with n draws."""
    z = mu + (0.5 * logvar).exp() * torch.randn(n, *mu.shape, dtype=torch.float64)        # (n, M, images, 1)
    log_lik = Bernoulli(logits=(z * A.double() + B.double())[..., pixels]).log_prob(x_obs.double()).sum(-1)
    return log_lik.mean(0) - losses.kl_per_dim(mu, logvar).sum(-1)


def test_fitted_components_have_a_higher_elbo_still_below_log_p_xo():
    observed = [0, 1]
    x_obs = ALL_X[:, observed]
    torch.manual_seed(0)
    mu, logvar = encode(ALL_X * torch.tensor([1.0, 1, 0, 0]))              # the hidden pixels at 0
    mu, logvar = mu.double()[None].repeat(3, 1, 1), logvar.double()[None].repeat(3, 1, 1)   # M = 3
    decode_obs = lambda z: decode(z)[:, observed].double()                  # noqa: E731
    fitted_mu, fitted_logvar = imputation.fit_components(x_obs.double(), mu, logvar, decode_obs, steps=1000, lr=0.01)
    before, after = mc_elbo(x_obs, mu, logvar, observed), mc_elbo(x_obs, fitted_mu, fitted_logvar, observed)
    exact = torch.tensor([exact_log_p(x, observed) for x in ALL_X], dtype=torch.float64)
    assert (after > before - 0.01).all() and (after - before).mean() > 0.05     # up, by most where it was far
    assert (after <= exact + 1e-3).all()                  # and an ELBO stays a lower bound
    assert (exact - after).max() < 0.03                   # a Gaussian fits this 1-d posterior closely


def test_fitting_moves_no_network_weight():
    torch.manual_seed(0)
    net = models.VAE("mlp", latent_dim=3, hidden_dim=16).eval()
    x = torch.rand(4, 1, 28, 28).bernoulli()
    mu, logvar = net.encode(x)
    before = [p.clone() for p in net.parameters()]
    imputation.fit_components(x.flatten(1), mu.detach()[None], logvar.detach()[None],
                              lambda z: net.decode(z).flatten(1), steps=3)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


@pytest.mark.parametrize("n_components, k", [(1, 50), (3, 50), (4, 6)])
def test_a_mixture_of_copies_of_q_is_q_draw_for_draw(n_components, k):
    """M copies of q(z|x) as the proposal: whichever component sample i comes from, z_i and q_k(z_i)
    are q(z|x)'s, so the estimate is the encoder's, draw for draw, also where M does not divide k."""
    torch.manual_seed(0)
    net = models.VAE("mlp", latent_dim=3, hidden_dim=16).eval()
    x = torch.rand(5, 1, 28, 28).bernoulli()
    mu, logvar = net.encode(x)
    copies = (mu.expand(n_components, -1, -1), logvar.expand(n_components, -1, -1))
    torch.manual_seed(7)
    mixture = losses.iw_log_px(x.flatten(1), None, lambda z: net.decode(z).flatten(1), k, max_elements=3000,
                               proposal=copies)
    torch.manual_seed(7)
    plain = losses.iw_log_px_plain(x, net.encode, net.decode, k)
    assert torch.allclose(mixture, plain, atol=1e-4)


def test_log_mixture_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar, z = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(5, 2, 4)    # M = 3, n = 2, L = 4
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(2, 3)),
        torch.distributions.Independent(Normal(mu.transpose(0, 1), (0.5 * logvar).exp().transpose(0, 1)), 1))
    assert torch.allclose(losses.log_mixture(z, mu, logvar), mix.log_prob(z), atol=1e-5)


def test_quadrants_are_pyros_split():
    # Pyro's MaskImages: 1 = bottom-left given, 2 = left half, 3 = all but the bottom-right
    for n_given, hidden_quadrants in ((1, ["tl", "tr", "br"]), (2, ["tr", "br"]), (3, ["br"])):
        hidden = imputation.hidden_mask(n_given)[0]
        quadrant = {"tl": hidden[:14, :14], "tr": hidden[:14, 14:], "bl": hidden[14:, :14], "br": hidden[14:, 14:]}
        for name, pixels in quadrant.items():
            assert pixels.all() if name in hidden_quadrants else not pixels.any()


def write_checkpoint(path, kind="vae", binarize="dynamic"):
    net = models.build_model(kind, "mlp", 2, 16)
    cfg = dataclasses.replace(main.Config(), model=kind, binarize=binarize)
    runs.save_checkpoint(path, net, dataclasses.asdict(cfg), 1, [])
    return path


def test_impute_end_to_end(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "vae.pt")
    data_dir = make_tiny_mnist(tmp_path / "data", n_test=12)        # the chains' cost grows with the images
    main.main(["--impute", str(ckpt), "--iw-samples", "10", "--data-dir", str(data_dir),
               "--out-dir", str(tmp_path / "out")])
    (run_dir,) = (tmp_path / "out").iterdir()
    assert {p.name for p in run_dir.iterdir()} == {"metrics.json", "completions.png"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 12 and set(metrics["neg_cond_log_lik"]) == {"1_quadrants", "2_quadrants",
                                                                                 "3_quadrants"}
    # fewer hidden pixels, less to predict: an untrained model's numbers still fall with the quadrants given
    values = list(metrics["neg_cond_log_lik"].values())
    assert values[0] > values[1] > values[2] > 0


@pytest.mark.parametrize("kind,binarize,extra,message", [
    ("cvae", "dynamic", [], "holds a CVAE: --impute needs an unconditional VAE"),
    ("vae", "none", [], "was trained on grey pixels (--binarize none)"),
    ("vae", "dynamic", ["--iw-samples", "0"], "give --iw-samples 1 or more"),
])
def test_impute_refuses_the_wrong_checkpoint(tiny_mnist, tmp_path, capsys, kind, binarize, extra, message):
    ckpt = write_checkpoint(tmp_path / "model.pt", kind, binarize)
    with pytest.raises(SystemExit) as exit:
        main.main(["--impute", str(ckpt), *extra, "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# A toy where every estimate's mean is known: one pixel x = 1 with p(x|z) = σ(3z + 1), z ~ N(0, 1),
# so p(x) = ∫ σ(3z + 1) N(z; 0, 1) dz (a 1-d integral, exact on the grid); M = 2 components
# N(∓2, 1.2²) (wide enough for a finite variance of the weights). Sample i comes from component
# i mod 2, so K = 1 draws from the first only and K = 3, 5 give it one sample more than the second.
TOY_MU = torch.tensor([-2.0, 2.0]).view(2, 1, 1)
TOY_LOGVAR = torch.full((2, 1, 1), 2 * math.log(1.2))


def toy_decode(z):
    return 3 * z + 1                                                          # (m, 1) logits


def toy_p_x():
    density = torch.sigmoid(3 * GRID + 1) * Normal(0.0, 1.0).log_prob(GRID).exp()
    return (density.sum() * DZ).item()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_the_mixture_estimate_of_p_x_is_unbiased_for_any_k(k):
    n = 200_000                                                              # independent estimates
    torch.manual_seed(0)
    log_p = losses.iw_log_px(torch.ones(n, 1), None, toy_decode, k,
                             proposal=(TOY_MU.expand(2, n, 1), TOY_LOGVAR.expand(2, n, 1)))
    p_hat = log_p.double().exp()                                             # E[p̂] = p(x): unbiased
    mean, stderr = p_hat.mean().item(), (p_hat.std() / math.sqrt(n)).item()
    assert abs(mean - toy_p_x()) < 4 * stderr


@pytest.mark.parametrize("k", [1, 3, 4])
def test_each_draw_is_weighted_by_the_mixture_the_k_draws_came_from(k):
    """Draw for draw, recomputed with torch.distributions from the same ε: z_i comes from component
    i mod 2, and log w_i = log p(x, z_i) − log Σ_m (n_m / k) N(z_i; μ_m, σ²), n_m the draws component
    m made. K = 1 weighs by the first component alone, not by the equal mixture (whose mean, on this
    toy, is far from p(x)); K = 4 by the equal mixture."""
    n = 50
    torch.manual_seed(0)
    log_p = losses.iw_log_px(torch.ones(n, 1), None, toy_decode, k,
                             proposal=(TOY_MU.expand(2, n, 1), TOY_LOGVAR.expand(2, n, 1)))
    torch.manual_seed(0)
    eps = torch.empty(k, n)
    for eps_i in eps:                                       # iw_log_px's draws: one sample index at a time
        eps_i.normal_()
    component = torch.arange(k) % 2
    z = (TOY_MU.view(2)[component, None] + 1.2 * eps).double()                # (k, n)
    share = torch.bincount(component, minlength=2).double() / k               # n_m / k
    log_q = torch.logsumexp(Normal(TOY_MU.view(2).double(), 1.2).log_prob(z[..., None]) + share.log(), dim=-1)
    log_w = Bernoulli(logits=3 * z + 1).log_prob(torch.ones(())) + Normal(0.0, 1.0).log_prob(z) - log_q
    torch.testing.assert_close(log_p.double(), torch.logsumexp(log_w, 0) - math.log(k), atol=1e-5, rtol=0)
