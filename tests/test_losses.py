"""The ELBO's terms, each computed a second, trusted way and compared."""
import math

import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

import losses
from models import reparameterize


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(7, 5), torch.randn(7, 5)
    q = Normal(mu, (0.5 * logvar).exp())
    p = Normal(torch.zeros(5), torch.ones(5))
    expected = kl_divergence(q, p).sum(dim=1)
    assert torch.allclose(losses.kl_to_standard_normal(mu, logvar), expected, atol=1e-5)


def test_kl_matches_monte_carlo_estimate():
    # KL(q || p) = E_q[log q(z) − log p(z)], estimated with 400,000 samples of z
    torch.manual_seed(0)
    mu, logvar = torch.tensor([[0.7, -1.2, 0.0]]), torch.tensor([[-0.5, 0.3, 1.0]])
    q = Normal(mu, (0.5 * logvar).exp())
    z = q.sample((400_000,))
    log_ratio = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)
    mc = log_ratio.mean()
    stderr = log_ratio.std() / math.sqrt(len(z))
    assert abs(losses.kl_to_standard_normal(mu, logvar).item() - mc.item()) < 4 * stderr.item()


def test_kl_is_zero_only_at_the_prior():
    zero = torch.zeros(2, 4)
    assert torch.allclose(losses.kl_to_standard_normal(zero, zero), torch.zeros(2))
    assert (losses.kl_to_standard_normal(torch.randn(3, 4), torch.randn(3, 4)) > 0).all()


def test_bernoulli_log_likelihood_matches_torch_distributions():
    torch.manual_seed(0)
    logits = 6 * torch.randn(5, 1, 28, 28)
    x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.3))
    expected = Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(losses.log_bernoulli(x, logits), expected, atol=1e-3)


def test_bernoulli_log_likelihood_is_finite_for_confident_logits():
    # log σ(−200) in float32 via log(sigmoid) is log 0 = −inf; from the logits it is −200
    x = torch.ones(1, 1, 28, 28)
    logits = torch.full((1, 1, 28, 28), -200.0)
    assert torch.allclose(losses.log_bernoulli(x, logits), torch.tensor([-200.0 * 784]))


def test_elbo_is_log_px_minus_kl():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    logits, mu, logvar = torch.randn(4, 1, 28, 28), torch.randn(4, 3), torch.randn(4, 3)
    elbo, log_px, kl = losses.elbo(x, logits, mu, logvar)
    assert elbo.shape == (4,)
    # a second computation, by torch.distributions (grey x, as --binarize none trains on):
    # Σ_pixels log Bernoulli(x; σ(logits)) − KL(q ‖ N(0, I))
    log_px_ref = torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(1).sum(1)
    q, prior = torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    kl_ref = torch.distributions.kl_divergence(q, prior).sum(1)
    assert torch.allclose(log_px, log_px_ref, rtol=1e-5) and torch.allclose(kl, kl_ref, rtol=1e-5)
    assert torch.allclose(elbo, log_px_ref - kl_ref, rtol=1e-5)


def test_gradients_flow_through_the_reparameterization():
    # E[z²] = μ² + σ² for z ~ N(μ, σ²), so d/dμ = 2μ and d/d(log σ²) = σ². The pathwise
    # (reparameterized) gradient of the Monte Carlo mean must estimate exactly these.
    torch.manual_seed(0)
    mu = torch.tensor([[0.8, -0.3]], requires_grad=True)
    logvar = torch.tensor([[0.2, -1.0]], requires_grad=True)
    z = reparameterize(mu.expand(200_000, 2), logvar.expand(200_000, 2))
    z.pow(2).mean(0).sum().backward()
    assert torch.allclose(mu.grad, 2 * mu.detach(), atol=0.02)
    assert torch.allclose(logvar.grad, logvar.detach().exp(), atol=0.02)


def test_elbo_is_below_the_exact_log_likelihood():
    # A model with a 1-D latent, p(x|z) = Bernoulli(σ(a z + b)) on 3 pixels: log p(x) is a 1-D
    # integral we compute on a fine grid; the ELBO with any q must lie below it (Jensen).
    torch.manual_seed(0)
    a, b = torch.tensor([2.0, -1.5, 0.5]), torch.tensor([0.3, 0.0, -0.7])
    x = torch.tensor([1.0, 0.0, 1.0])
    grid = torch.linspace(-10, 10, 20001)
    log_joint = (Bernoulli(logits=grid[:, None] * a + b).log_prob(x).sum(1)
                 + Normal(0.0, 1.0).log_prob(grid))
    log_px = torch.logsumexp(log_joint, 0) + math.log(grid[1] - grid[0])
    for mu, logvar in ((0.0, 0.0), (0.5, -1.0), (-1.0, 0.5)):
        mu_t, logvar_t = torch.full((100_000, 1), mu), torch.full((100_000, 1), logvar)
        z = reparameterize(mu_t, logvar_t)
        logits = (z * a + b)[:, :, None, None]                       # (k, 3, 1, 1) as an "image"
        elbo, _, _ = losses.elbo(x.expand(100_000, 3)[:, :, None, None], logits, mu_t, logvar_t)
        assert elbo.mean() < log_px



def test_bernoulli_gradient_is_x_minus_sigmoid_and_matches_autograd():
    # log_bernoulli against autograd through the softplus form, its gradient against x − σ(l),
    # and against finite differences (gradcheck), for grey and for binary x
    torch.manual_seed(0)
    for x in (torch.rand(3, 1, 4, 4, dtype=torch.double), torch.rand(3, 1, 4, 4, dtype=torch.double).round()):
        logits = (4 * torch.randn(3, 1, 4, 4, dtype=torch.double)).requires_grad_()
        x = x.requires_grad_()
        reference = (x * logits - torch.nn.functional.softplus(logits)).flatten(1).sum(1)
        weights = torch.randn(3, dtype=torch.double)
        grads = torch.autograd.grad((losses.log_bernoulli(x, logits) * weights).sum(), (logits, x))
        expected = torch.autograd.grad((reference * weights).sum(), (logits, x))
        assert torch.allclose(losses.log_bernoulli(x, logits), reference)
        assert all(torch.allclose(g, e) for g, e in zip(grads, expected))
        assert torch.allclose(grads[0], (x - logits.sigmoid()) * weights.view(3, 1, 1, 1))
        assert torch.autograd.gradcheck(losses.log_bernoulli, (x, logits))
