"""The importance-weighted log-likelihood [IWAE] and the collapse diagnostics, checked against
exact answers: log p(x) by numerical integration, torch.distributions, constructed cases."""
import math

import torch
import torch.nn as nn
from torch.distributions import Independent, Normal, kl_divergence

from conftest import DZ, GRID, TOY_A as A, TOY_B as B, exact_log_p, log_joint_on_grid
import losses

# conftest's toy: z ~ N(0, 1) in one dimension, 4 pixels p(x_d|z) = Bernoulli(σ(a_d z + b_d)).
# decode returns logits shaped (m, 4, 1, 1), an "image" like the real decoders' (m, 1, 28, 28),
# so iw_log_px must flatten them.
X = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])   # 3 images


def decode(z):
    return (z * A + B)[:, :, None, None]                                  # (m, 4, 1, 1)


def exact_posterior_moments(x):
    """Mean and variance of the exact posterior p(z|x), on the same grid."""
    log_joint = log_joint_on_grid(x)
    post = torch.softmax(log_joint, 0)
    mean = (post * GRID).sum()
    return mean.item(), (post * (GRID - mean) ** 2).sum().item()


def exact_elbo(x, mu, logvar):
    """E_q[log p(x, z) − log q(z|x)] for q = N(mu, exp(logvar)), integrated on the grid."""
    log_q = Normal(mu, math.exp(0.5 * logvar)).log_prob(GRID)
    return (log_q.exp() * (log_joint_on_grid(x) - log_q)).sum().item() * DZ


def gaussian_q(shift, var_scale):
    """q(z|x) per image: the exact posterior's mean moved by `shift` posterior std's and its
    variance multiplied by `var_scale`; (0, 1) is the moment-matched Gaussian."""
    moments = [exact_posterior_moments(x) for x in X]
    mu = torch.tensor([[m + shift * math.sqrt(v)] for m, v in moments])
    logvar = torch.tensor([[math.log(var_scale * v)] for m, v in moments])
    return mu, logvar                                                      # (3, 1) each


def iw_repeated(mu, logvar, k, reps, seed=0):
    """iw_log_px on `reps` copies of the 3 images: (reps, 3) independent estimates."""
    x = X.repeat(reps, 1)[:, :, None, None]
    q = (mu.repeat(reps, 1), logvar.repeat(reps, 1))
    torch.manual_seed(seed)
    return losses.iw_log_px(x, lambda x: q, decode, k).view(reps, 3)


EXACT = torch.tensor([exact_log_p(x) for x in X])
BAD_Q = gaussian_q(shift=0.8, var_scale=3.0)      # off-centre and too wide: a loose ELBO
GOOD_Q = gaussian_q(shift=0.0, var_scale=1.0)     # the posterior's own mean and variance


def test_iw_estimate_approaches_the_exact_log_px_from_below():
    gaps, stderrs = {}, {}
    for k, reps in ((1, 2000), (10, 1000), (1000, 300)):
        est = iw_repeated(*BAD_Q, k, reps)
        gaps[k] = EXACT - est.mean(0)                           # log p(x) − mean L_k, per image
        stderrs[k] = est.std(0) / math.sqrt(reps)
        # a lower bound on average: never significantly above the exact value
        assert (gaps[k] > -4 * stderrs[k] - 1e-3).all(), (k, gaps[k], stderrs[k])
    assert (gaps[1] > 0.3).all()                          # with a poor q, one sample is a loose bound
    assert (gaps[1000].abs() < 0.01).all()                # 1000 samples all but close the gap
    assert (gaps[1000].abs() < gaps[1] / 30).all()
    # with q equal to the posterior's Gaussian fit, even one sample is nearly exact
    good_gap = EXACT - iw_repeated(*GOOD_Q, 1, 2000).mean(0)
    assert (good_gap.abs() < gaps[1] / 10).all()


def test_bound_tightens_with_k():
    # L_1 <= L_10 <= L_100 <= log p(x)   [IWAE §3], averaged over many independent estimates
    means, stderrs = [], []
    for k, reps in ((1, 4000), (10, 3000), (100, 1000)):
        est = iw_repeated(*BAD_Q, k, reps, seed=k).mean(1)               # average over the 3 images
        means.append(est.mean())
        stderrs.append(est.std() / math.sqrt(reps))
    for i in range(2):
        assert means[i + 1] - means[i] > 3 * math.hypot(stderrs[i], stderrs[i + 1])
    assert means[2] < EXACT.mean() + 3 * stderrs[2]


def test_one_sample_is_the_elbo_with_a_sampled_kl():
    mu, logvar = BAD_Q
    x = X[:, :, None, None]
    # the same z: L_1 = log p(x|z) + log p(z) − log q(z|x), with log_bernoulli as the reference
    torch.manual_seed(1)
    l1 = losses.iw_log_px(x, lambda x: (mu, logvar), decode, k=1)
    torch.manual_seed(1)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    reference = (losses.log_bernoulli(x, decode(z)) + losses.log_standard_normal(z)
                 - losses.log_normal(z, mu, logvar))
    assert torch.allclose(l1, reference, atol=1e-5)
    # its expectation is the ELBO, integrated exactly on the grid
    est = iw_repeated(mu, logvar, 1, 4000)
    elbo = torch.tensor([exact_elbo(X[i], mu[i, 0].item(), logvar[i, 0].item()) for i in range(3)])
    assert ((est.mean(0) - elbo).abs() < 4 * est.std(0) / math.sqrt(4000)).all()


def test_chunking_does_not_change_the_estimate():
    # a small VAE-shaped model on 28x28 images; the same seed with one sample per decoder call
    # and with all samples in one call must draw the same z and give the same numbers
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 2 * 3))
    dec = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 784), nn.Unflatten(1, (1, 28, 28)))
    x = torch.rand(5, 1, 28, 28)                                           # grey, as in main.py
    estimates = []
    for seed, max_elements in ((7, 1), (7, None), (7, 2**30), (8, None)):
        torch.manual_seed(seed)
        estimates.append(losses.iw_log_px(x, lambda x: enc(x).chunk(2, dim=1), dec, 300, max_elements))
    assert estimates[0].shape == (5,) and not estimates[0].requires_grad
    # equal up to float32 rounding (the matrix products sum in a different order) ...
    assert torch.allclose(estimates[0], estimates[1], rtol=1e-5, atol=0)
    assert torch.allclose(estimates[0], estimates[2], rtol=1e-5, atol=0)
    # ... while other draws of z move the estimate far more than that
    assert (estimates[0] - estimates[3]).abs().max() > 10 * 1e-5 * estimates[0].abs().max()


def test_the_fast_estimate_is_the_plain_one_draw_for_draw():
    """iw_log_px (chunked, in-place Bernoulli, accumulated by logaddexp) against the few lines of
    iw_log_px_plain that the paper -> code map points to: the same seed gives the same z, so the
    same numbers up to float32 rounding, for any chunk size."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 2 * 3))
    dec = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 784), nn.Unflatten(1, (1, 28, 28)))
    x = torch.rand(5, 1, 28, 28).bernoulli()
    encode = lambda x: enc(x).chunk(2, dim=1)           # noqa: E731
    with torch.no_grad():
        torch.manual_seed(3)
        plain = losses.iw_log_px_plain(x, encode, dec, 40)
        for max_elements in (1, 784 * 5 * 7, None):
            torch.manual_seed(3)
            assert torch.allclose(losses.iw_log_px(x, encode, dec, 40, max_elements), plain, rtol=1e-5, atol=0)
        torch.manual_seed(4)                            # other draws differ by far more than the rounding
        assert (losses.iw_log_px(x, encode, dec, 40) - plain).abs().max() > 1e-3


def test_labels_bound_by_the_caller_give_log_px_given_y():
    # A conditional toy: p(x_d|y, z) = Bernoulli(σ(a_d z + b_d + c_yd)). The CVAE pattern from the
    # docstring, decode = lambda z: net.decode(z, y.repeat(len(z) // len(y))), must pair every
    # sample with its own image's label: log p(x|y) differs by nats between the two labels.
    c = torch.tensor([[1.5, -1.0, 0.5, 0.0], [-1.5, 1.0, -0.5, 0.5]])

    def net_decode(z, y):
        return decode(z) + c[y][:, :, None, None]

    x, y = X[[0, 0, 1, 2]], torch.tensor([0, 1, 1, 0])
    exact = torch.tensor([exact_log_p(x[i], logits_bias=B + c[y[i]]) for i in range(4)])
    assert (exact[0] - exact[1]).abs() > 1.0
    reps = 200
    x, y = x.repeat(reps, 1)[:, :, None, None], y.repeat(reps)
    prior_q = (torch.zeros(len(y), 1), torch.zeros(len(y), 1))     # q = p(z): poor, but valid
    torch.manual_seed(0)
    est = losses.iw_log_px(x, lambda x: prior_q, lambda z: net_decode(z, y.repeat(len(z) // len(y))), 500)
    assert ((est.view(reps, 4).mean(0) - exact).abs() < 0.02).all()


def test_iw_rejects_bad_arguments():
    q = (torch.zeros(3, 1), torch.zeros(3, 1))
    x = X[:, :, None, None]
    for k in (0, -1):
        try:
            losses.iw_log_px(x, lambda x: q, decode, k)
            assert False, "k < 1 accepted"
        except ValueError as err:
            assert "k >= 1" in str(err)
    try:   # a CVAE decode that forgot to repeat the labels returns logits for too few rows
        losses.iw_log_px(x, lambda x: q, lambda z: decode(z[:3]), 10, max_elements=2**10)
        assert False, "wrong number of logits accepted"
    except ValueError as err:
        assert "one logit per pixel" in str(err)


def test_fast_bernoulli_matches_log_bernoulli():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    x[:3] = x[:3].round()                                                  # binary and grey images
    logits = 8 * torch.randn(4, 6, 1, 28, 28)
    logits[0, 0, 0, :5] = 200.0                                            # confident pixels
    logits[1, 1, 0, :5] = -200.0
    fast = losses.log_bernoulli_samples(x.flatten(1) - 0.5, logits.flatten(2))
    reference = torch.stack([losses.log_bernoulli(x, logits[s]) for s in range(4)])
    assert fast.shape == (4, 6)
    assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-3)


def test_log_normal_matches_torch_distributions():
    torch.manual_seed(0)
    z, mu, logvar = torch.randn(5, 7, 3), torch.randn(7, 3), torch.randn(7, 3)
    expected = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    assert torch.allclose(losses.log_normal(z, mu, logvar), expected, atol=1e-5)
    expected_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(losses.log_standard_normal(z), expected_prior, atol=1e-5)


def test_kl_per_dim_matches_torch_distributions_and_sums_to_the_kl():
    torch.manual_seed(0)
    mu, logvar = torch.randn(7, 5), torch.randn(7, 5)
    per_dim = losses.kl_per_dim(mu, logvar)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    assert per_dim.shape == (7, 5)
    assert torch.allclose(per_dim, expected, atol=1e-5)
    joint = kl_divergence(Independent(Normal(mu, (0.5 * logvar).exp()), 1),
                          Independent(Normal(torch.zeros(5), torch.ones(5)), 1))        # KL of the whole z
    assert torch.allclose(losses.kl_to_standard_normal(mu, logvar), joint, atol=1e-5)


def test_active_units_counts_the_means_that_move_with_x():
    torch.manual_seed(0)
    n = 5000
    mu = torch.stack([
        torch.randn(n),              # variance 1: active
        0.5 * torch.randn(n),        # 0.25: active
        torch.full((n,), 0.3),       # constant: collapsed to one q for every x
        0.01 * torch.randn(n),       # 1e-4: below the 0.01 threshold
        0.2 * torch.randn(n),        # 0.04: active
        0.05 * torch.randn(n),       # 0.0025: inactive
    ], dim=1)
    count, activity = losses.active_units(mu)
    assert count == 3
    assert torch.equal(activity > 0.01, torch.tensor([True, True, False, False, True, False]))
    expected = torch.tensor([1.0, 0.25, 0.0, 1e-4, 0.04, 0.0025])
    assert torch.allclose(activity, expected, rtol=0.1, atol=1e-6)
    assert losses.active_units(mu, threshold=0.5)[0] == 1


def test_bits_per_dim():
    assert math.isclose(losses.bits_per_dim(784 * math.log(2)), 1.0)
    assert math.isclose(losses.bits_per_dim(100.0), 0.184017225, rel_tol=1e-6)    # 100 / (784 ln 2)
    assert math.isclose(losses.bits_per_dim(2 * math.log(2), x_dim=2), 1.0)
    nats = torch.tensor([0.0, 784 * math.log(2)])
    assert torch.allclose(losses.bits_per_dim(nats), torch.tensor([0.0, 1.0]))
