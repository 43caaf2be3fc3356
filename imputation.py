"""Imputation with an unconditional VAE: Sohn et al. 2015's MNIST quadrant task, scored by the
conditional log-likelihood of the hidden pixels.

    python main.py @configs/impute.args    # = --impute checkpoints/vae-mlp-binarized.pt --iw-samples 1000

Given 1, 2 or 3 quadrants of a binarized test digit (x_o), the model fills in the rest (x_h).
Pyro's CVAE tutorial (pyro.ai/examples/cvae.html, examples/cvae/mnist.py, MaskImages) gives
  1 quadrant: the bottom-left;  2: the left half;  3: all but the bottom-right,
and so do we. The score is −log p(x_h|x_o) in nats per image, with

  log p(x_h|x_o) = log p(x) − log p(x_o),   log p(x_o) = log Σ_{x_h} p(x_o, x_h) = log ∫ p(x_o|z) p(z) dz

The decoder factorises over pixels, so p(x_o|z) is p(x|z) with the hidden pixels left out of the
sum over pixels, and both terms are importance-sampling estimates [IWAE §3]:
  log p(x)   with z ~ q(z|x), K samples (losses.iw_log_px);
  log p(x_o) with z ~ a mixture of M Gaussians, each started at q(z|x_o, x̂_h^m), where
             x̂_h^1..x̂_h^M are completions drawn by M short chains (z ~ q(z|x̂), x̂_h ~ p(x_h|z), as
             Rezende et al. 2014, arXiv:1401.4082), then fitted to p(z|x_o) by a few steps of
             gradient ascent on its own ELBO of log p(x_o); K samples, K/M from each component,
             weighted by the whole mixture's density (multiple importance sampling, balance heuristic;
             when M does not divide K, each component weighted by its share of the K samples).
Each estimate is, in expectation, a lower bound on its log-probability that tightens as K grows;
their difference is neither an upper nor a lower bound on log p(x_h|x_o), only consistent as
K -> ∞. An underestimated log p(x_o) makes the reported −log p(x_h|x_o) look *better*, which is
why the proposal for x_o is made as good as we could and the K-dependence is reported.
"""
import torch

import data
import losses
import models
from viz import complete, draw_grid, figure, grid_size, save_figure

N_CHAINS = 20           # M: completions per image, one mixture component each
CHAIN_STEPS = 50        # steps of each completion chain
FIT_STEPS = 50          # Adam steps fitting each component to p(z|x_o), 0 = the chains' q as they are
                        # (RESULTS.md: 200 steps moved the score by 0.3 nats at most)
FIT_LR = 0.05           # their learning rate, on μ and log σ² (not tuned)
BATCH = 500             # test images per pass
# Pyro's CVAE tutorial, negative conditional log-likelihood of the hidden pixels (nats), for 1, 2, 3
# given quadrants: its NN baseline (masked BCE) and its CVAE (the −ELBO of Trace_ELBO, grey pixels)
PYRO_NN = {1: 100.4, 2: 61.9, 3: 25.4}
PYRO_CVAE = {1: 71.8, 2: 51.0, 3: 24.2}


def hidden_mask(n_given, shape=(1, 28, 28)):
    """True on the pixels to fill in, given 1 (bottom-left), 2 (left half) or 3 (all but the
    bottom-right) quadrants: Pyro's MaskImages split."""
    h, w = shape[-2:]
    given = torch.zeros(shape, dtype=torch.bool)
    given[..., h // 2:, :w // 2] = True                  # bottom-left: always given
    if n_given >= 2:
        given[..., :, :w // 2] = True                    # the left half
    if n_given == 3:
        given[..., :h // 2, :] = True                    # and the top half
    return ~given


# ---------------------------------------------------------------------------------------------
# The proposal for log p(x_o): M completion chains, each a Gaussian q(z|x_o, x̂_h^m)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def completion_chains(x, hidden, encode, decode, n_chains=N_CHAINS, steps=CHAIN_STEPS):
    """(mu, logvar) of q(z|x_o, x̂_h^m), each (M, n, latent_dim), and the completions x̂ (M, n, ...).

    Each is viz.complete's chain with the hidden pixels started at 0 and drawn at every step,
    z ~ q(z|x̂), x̂_h ~ Bernoulli(σ(l(z))), the observed pixels held at x: a pseudo-Gibbs chain whose
    samples approximate p(x_h|x_o) [Rezende, Mohamed & Wierstra 2014]. Random: seed outside.
    """
    x_rep = x.repeat(n_chains, *[1] * (x.dim() - 1))                   # (M * n, ...), chain-major
    x_hat = complete(encode, decode, x_rep, hidden, steps, start="zeros", pixels="samples")
    mu, logvar = encode(x_hat)
    return mu.view(n_chains, len(x), -1), logvar.view(n_chains, len(x), -1), x_hat.view(n_chains, *x.shape)


def fit_components(x_obs, mu, logvar, decode_obs, steps=FIT_STEPS, lr=FIT_LR):
    """Each Gaussian N(μ_m, σ_m²) moved towards p(z|x_o) by Adam on its ELBO of log p(x_o):

        ELBO_m = E_{z ~ N(μ_m, σ_m²)}[log p(x_o|z)] − KL(N(μ_m, σ_m²) || N(0, I))   [AEVB Eq. 10, x_o for x]

    one reparameterized z per component and step; only (μ_m, log σ_m²) move, not the network.
    The encoder's q is amortized and never saw a completion chain's guesses; a per-image fit
    closes that gap (the refinement of Krishnan, Liang & Hoffman 2018, arXiv:1710.06085). Each component
    moves towards a local optimum of its ELBO near its chain's guess (a fixed number of steps, no
    convergence test), so the mixture keeps the chains' spread over the modes of p(z|x_o).
    x_obs (n, d) observed pixels; mu, logvar (M, n, L); decode_obs(z) -> (., d) logits.
    """
    mu, logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    optimizer = torch.optim.Adam([mu, logvar], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            z = models.reparameterize(mu, logvar)                                  # (M, n, L)
            x_logits = decode_obs(z.flatten(0, 1)).view(*z.shape[:2], -1)          # (M, n, d)
            # Σ_m ELBO_m: the components are independent, so its gradient is each one's own
            elbo = losses.log_bernoulli(x_obs.expand_as(x_logits), x_logits).sum() - losses.kl_per_dim(mu, logvar).sum()
            mu.grad, logvar.grad = torch.autograd.grad(-elbo, [mu, logvar])      # the network gets no .grad
            optimizer.step()
    return mu.detach(), logvar.detach()


def log_px_observed(x, hidden, encode, decode, k, n_chains=N_CHAINS, steps=CHAIN_STEPS, fit_steps=FIT_STEPS):
    """log p(x_o) per image (n,): the hidden pixels left out of log p(x|z), the mixture proposal."""
    observed = ~hidden.flatten()                                       # the same pixels in every image
    x_obs = x.flatten(1)[:, observed]                                  # (n, d_o)
    decode_obs = lambda z: decode(z).flatten(1)[:, observed]           # noqa: E731
    mu, logvar, _ = completion_chains(x, hidden, encode, decode, n_chains, steps)
    mu, logvar = fit_components(x_obs, mu, logvar, decode_obs, fit_steps)
    return losses.iw_log_px(x_obs, None, decode_obs, k, proposal=(mu, logvar))    # z ~ the mixture


@torch.no_grad()
def conditional_nll(net, x, k, seed, n_given=(1, 2, 3)):
    """{'log_px': (n,), q: (n,) of −log p(x_h|x_o) for q given quadrants}, batch by batch, seeded."""
    parts = {"log_px": [], **{q: [] for q in n_given}}
    with data.seeded(x.device, seed):
        for xb, _ in data.batches(x, x, BATCH):
            log_px = losses.iw_log_px(xb, net.encode, net.decode, k)
            parts["log_px"].append(log_px)
            for q in n_given:
                hidden = hidden_mask(q).to(x.device)
                parts[q].append(log_px_observed(xb, hidden, net.encode, net.decode, k) - log_px)
    return {name: torch.cat(p).cpu() for name, p in parts.items()}


# ---------------------------------------------------------------------------------------------
# --impute: the report and the completions
# ---------------------------------------------------------------------------------------------
def metrics(result, iw_samples, n_images):
    """The run's numbers: −log p(x) and −log p(x_h|x_o) for 1, 2, 3 given quadrants (nats, test mean),
    beside the proposal's settings and Pyro's. result: conditional_nll's."""
    return {"test_images": n_images, "iw_samples": iw_samples, "n_chains": N_CHAINS, "chain_steps": CHAIN_STEPS,
            "fit_steps": FIT_STEPS, "fit_lr": FIT_LR, "neg_log_px": -result["log_px"].mean().item(),
            "neg_cond_log_lik": {f"{q}_quadrants": result[q].mean().item() for q in (1, 2, 3)},
            "pyro_nn": PYRO_NN, "pyro_cvae": PYRO_CVAE}


def print_report(report):
    print(f"−log p(x) {report['neg_log_px']:.2f}; −log p(x_h|x_o) for 1 / 2 / 3 given quadrants: "
          + " / ".join(f"{v:.2f}" for v in report["neg_cond_log_lik"].values()) + f" nats ({report['seconds']:.0f} s)")


@torch.no_grad()
def completions_figure(net, x, y, seed, path, n_samples=6):
    """For 1, 2, 3 given quadrants: one test digit per class, its input, and n_samples completions,
    each the decoder's pixel means σ(l(z)) at z ~ q(z|x_o, x̂_h^m), one chain m per column."""
    idx = torch.stack([torch.nonzero(y == d)[0, 0] for d in range(10) if (y == d).any()])
    width, height = grid_size(len(idx), n_samples + 2)
    fig, axes = figure(1, 3, figsize=(3 * width + 1.2, height + 0.8),
                             gridspec_kw={"wspace": 0.06, "left": 0.01, "right": 0.99})
    for ax, q in zip(axes, (1, 2, 3)):
        hidden = hidden_mask(q).to(x.device)
        with data.seeded(x.device, seed):
            mu, logvar, _ = completion_chains(x[idx], hidden, net.encode, net.decode, n_samples)
            means = torch.sigmoid(net.decode(models.reparameterize(mu, logvar).flatten(0, 1)))
        filled = torch.where(hidden, means.view(n_samples, *x[idx].shape), x[idx]).transpose(0, 1)
        shown = torch.where(hidden, torch.full_like(x[idx], 0.5), x[idx])
        images = torch.cat([x[idx, None], shown[:, None], filled], 1).flatten(0, 1)
        draw_grid(ax, images, n_samples + 2, col_labels=["original", "given"] + [str(i + 1) for i in range(n_samples)])
        ax.set_title(f"{q} quadrant{'s' * (q > 1)} given", fontsize=10)
    fig.suptitle("VAE completions of binarized test digits: hidden pixels from 0, drawn ~ Bernoulli at each of "
                 f"{CHAIN_STEPS} steps;\nshown: the decoder means σ(l(z)) at z ~ q(z|x_o, x̂_h), one chain per column",
                 fontsize=10)
    save_figure(fig, path)
