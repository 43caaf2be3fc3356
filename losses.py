"""The evidence lower bound (ELBO) of the VAE and of the label-conditional VAE, term by term,
and the importance-weighted estimate of log p(x) and the collapse diagnostics that evaluate them.

Papers, with the arXiv version whose equation numbers the tags below use:
  AEVB = Kingma & Welling 2013, "Auto-Encoding Variational Bayes", arXiv:1312.6114v10
  M2   = Kingma, Rezende, Mohamed & Welling 2014, "Semi-Supervised Learning with Deep
         Generative Models", arXiv:1406.5298v2 (the labelled-data bound of model M2)
  CVAE = Sohn, Lee & Yan 2015, "Learning Structured Output Representation using Deep
         Conditional Generative Models", NeurIPS 2015
  IWAE = Burda, Grosse & Salakhutdinov 2015, "Importance Weighted Autoencoders",
         arXiv:1509.00519, cited by section (§3 the k-sample bound L_k, §5.2 active units)

Notation follows M2: x is the image, y its label, z the latent code. Sohn et al. write the same
model with the roles of the letters swapped (their x is the condition, their y the output), so
their p(y|x, z) is our p(x|y, z) and their q(z|x, y) is ours with the letters exchanged.

Every loss returns one value per example (shape (n,)); the caller decides how to reduce.
kl_per_dim keeps the latent dimension, and active_units summarises a whole data set.
All quantities are in nats. `log_px` and `elbo` are log-probabilities (<= 0 for binary x), `kl`
is a divergence (>= 0); the negated, averaged ELBO is called `loss` only where the optimiser
sees it (main.py).
"""
import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def log_bernoulli(x, x_logits):
    """log p(x|z) for a Bernoulli decoder, summed over the pixels.   [AEVB App. C.1]

    log p(x|z) = Σ_d x_d log σ(l_d) + (1 − x_d) log(1 − σ(l_d)) = Σ_d x_d l_d − softplus(l_d),
    l = decoder logits. Computed from the logits, never as log(sigmoid(l)), which underflows to
    log 0 = −inf for confident pixels: the per-pixel term is −binary_cross_entropy_with_logits,
    whose gradient with respect to l_d is x_d − σ(l_d).

    For grey x in [0, 1] this is the cross-entropy the PyTorch example and AEVB's MNIST runs
    optimise; it is not the log-likelihood of any distribution over grey images (a Bernoulli
    has only 0 and 1 in its support), so numbers on grey MNIST compare only with numbers
    computed the same way.

    Why the library's function: a hand-written forward and backward (benchmarks/epoch_speed.py
    keeps it and times both) was faster on one CPU and not on others (docs/speed.md), and a
    reference implementation keeps hand-written code only where it pays everywhere.
    """
    if x.shape != x_logits.shape or x.dim() < 2:
        raise ValueError(f"log_bernoulli needs x and x_logits of one shape (n, ...), a batch of n images, "
                         f"got {tuple(x.shape)} and {tuple(x_logits.shape)}")
    bce = F.binary_cross_entropy_with_logits(x_logits, x, reduction="none")     # −log p(x_d|z) per pixel
    return -bce.flatten(1).sum(dim=1)                                           # (n,)


def kl_per_dim(mu, logvar):
    """KL(q(z_j|x) || N(0, 1)) for each latent dimension j: shape (n, latent_dim).   [AEVB App. B]

    −KL_j = ½ (1 + log σ_j² − μ_j² − σ_j²)
    A unit whose KL_j is ≈ 0 for every x has collapsed to the prior: q(z_j|x) = p(z_j), so z_j
    tells the decoder nothing about x.
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())               # (n, latent_dim), >= 0


def kl_to_standard_normal(mu, logvar):
    """KL(q(z|x) || p(z)) for q = N(mu, diag σ²) and p = N(0, I), summed over z.   [AEVB App. B]

    −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)
    """
    return kl_per_dim(mu, logvar).sum(dim=1)                            # (n,), >= 0


def elbo(x, x_logits, mu, logvar):
    """The single-sample SGVB estimate of the ELBO, with the KL in closed form.   [AEVB Eq. 10]

    L(x) = −KL(q(z|x) || p(z)) + log p(x|z),   z = μ + σ ⊙ ε,  ε ~ N(0, I)
    Returns (elbo, log_px, kl), each of shape (n,); elbo = log_px − kl <= log p(x).
    """
    log_px = log_bernoulli(x, x_logits)
    kl = kl_to_standard_normal(mu, logvar)
    return log_px - kl, log_px, kl


def conditional_elbo(x, x_logits, mu, logvar):
    """The conditional ELBO of log p(x|y), one sample of z, KL in closed form.

    log p(x|y) >= E_q(z|x,y)[log p(x|y, z)] − KL(q(z|x, y) || p(z))     [CVAE §3; M2 Eq. 6]

    The formula is the VAE's with every distribution conditioned on the label, so the code is
    the same: x_logits must come from p(x|y, z) and (mu, logvar) from q(z|x, y). Two choices:
    - p(z) = N(0, I) does not depend on y, as in M2. (Sohn et al. also allow a learned prior
      p(z|x) in their notation; with a fixed prior, y must enter through the decoder.)
    - M2's bound on log p(x, y) adds log p(y) = log(1/10), a constant with no gradient; we
      report the bound on log p(x|y), which leaves it out.
    Returns (elbo, log_px, kl), each of shape (n,).
    """
    return elbo(x, x_logits, mu, logvar)


# ---------------------------------------------------------------------------------------------
# Evaluation: the importance-weighted estimate of log p(x), and diagnostics of posterior collapse
# ---------------------------------------------------------------------------------------------
def log_normal(z, mu, logvar):
    """log N(z; μ, diag σ²), summed over the last dimension: one value per sample of z.

    log N(z; μ, σ²) = −½ Σ_j (log 2π + log σ_j² + (z_j − μ_j)² / σ_j²)
    """
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(dim=-1)


def log_standard_normal(z):
    """log p(z) for the prior p(z) = N(0, I): −½ Σ_j (log 2π + z_j²), one value per sample."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(dim=-1)


def log_bernoulli_samples(x_centered, x_logits):
    """log p(x|z) of n images under s samples of z each: x_logits (s, n, x_dim) -> (s, n),
    or (n, x_dim) -> (n,) for one sample each.

    The number log_bernoulli computes, x_d l_d − softplus(l_d) per pixel, rewritten for speed:
      log p(x_d|z) = (x_d − ½) l_d − ½|l_d| + log σ(|l_d|)
    from softplus(l) = max(l, 0) − log σ(|l|) and max(l, 0) = ½(l + |l|). σ(|l|) lies in [½, 1],
    so its log never underflows; a sigmoid and a log cost about a tenth of softplus's log1p on
    CPU (measured), and the pixels are combined before the sum, so no large terms cancel.
    x_centered is x − ½, shape (n, x_dim), computed once by the caller.
    """
    abs_logits = x_logits.abs()
    log_px = x_logits * x_centered                    # (x − ½) l, broadcast over the s samples
    log_px.sub_(abs_logits, alpha=0.5)                # − ½|l|
    log_px.add_(abs_logits.sigmoid_().log_())         # + log σ(|l|)
    return log_px.sum(dim=-1)


def iw_log_px_plain(x, encode, decode, k):
    """The k-sample importance-weighted estimate of log p(x), one value per image: shape (n,).

    log p(x) ≈ log (1/k) Σ_i w_i,   w_i = p(x|z_i) p(z_i) / q(z_i|x),   z_1..z_k ~ q(z|x)   [IWAE §3]
    Its expectation L_k is a lower bound that tightens with k: ELBO = L_1 <= L_k <= L_k+1 <= log p(x).
    The plain version, all k samples at once; iw_log_px below is the same estimate, draw for draw,
    in chunks that fit in memory (for k = 5000 on the test set this one would hold 4·10^10 logits).
    """
    mu, logvar = encode(x)                                             # q(z|x): (n, L) each
    eps = torch.stack([torch.randn_like(mu) for _ in range(k)])        # one draw per sample i, as iw_log_px
    z = mu + torch.exp(0.5 * logvar) * eps                             # (k, n, L), z ~ q(z|x)
    x_logits = decode(z.flatten(0, 1)).view(k, len(x), -1)             # p(x|z): (k, n, x_dim)
    log_px_z = log_bernoulli(x.flatten(1).expand(k, -1, -1).flatten(0, 1), x_logits.flatten(0, 1)).view(k, -1)
    log_w = log_px_z + log_standard_normal(z) - log_normal(z, mu, logvar)          # (k, n)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


# Most logits held at once by iw_log_px: a few MB on a CPU, which stay in its cache (docs/speed.md
# has the measurement); a GPU wants large chunks, so that few kernels are launched.
IW_MAX_ELEMENTS = {"cpu": 2**20, "cuda": 2**24}


def log_mixture(z, mu, logvar, weights=None):
    """log q_mix(z) = log Σ_m w_m N(z; μ_m, σ_m²): z (s, n, L), mu/logvar (M, n, L) -> (s, n).
    weights (M,) sum to 1; None: the equal weights 1/M."""
    per_component = log_normal(z[:, None], mu[None], logvar[None])     # (s, M, n)
    if weights is None:
        return torch.logsumexp(per_component, dim=1) - math.log(len(mu))
    return torch.logsumexp(per_component + weights.log()[None, :, None], dim=1)


@torch.no_grad()
def iw_log_px(x, encode, decode, k, max_elements=None, proposal=None):
    """iw_log_px_plain, fast: the same estimate of log p(x), draw for draw, a chunk of samples at a time.

    encode(x) -> (mu, logvar) of q(z|x), each (n, latent_dim); decode(z) -> logits of p(x|z).
    decode is called on z of shape (s * n, latent_dim) ordered sample-major: row i * n + j is
    sample i of image j. For the CVAE, bind the labels and the same code gives log p(x|y):
        encode = lambda x: net.encode(x, y)
        decode = lambda z: net.decode(z, y.repeat(len(z) // len(y)))

    proposal: instead of q(z|x), a mixture of M Gaussians per image, (mu, logvar) each (M, n, L)
    (imputation.py's; encode is then not called). Sample i comes from component i mod M, so
    component m draws n_m of the k samples, and each is weighted by q_k(z) = Σ_m (n_m / k) N(z; μ_m, σ_m²),
    the density the k draws came from: E[(1/k) Σ_i w_i] = p(x) for every k (multiple importance
    sampling, balance heuristic [Veach & Guibas 1995]). q(z|x) is the mixture of one component.

    Memory: each decoder call holds at most max_elements logits (default IW_MAX_ELEMENTS for the
    device), or one sample for every image if that is more; pass fewer images to go lower.
    Randomness: ε_i ~ N(0, I) of shape (n, latent_dim) is drawn one sample index i at a time, so
    the estimate depends on the seed (set by the caller), not on max_elements.
    """
    if k < 1:
        raise ValueError(f"iw_log_px needs k >= 1 samples of z per image, got k={k}")
    mu, logvar = proposal if proposal is not None else [t[None] for t in encode(x)]     # (M, n, L) each
    n_components, n, latent_dim = mu.shape
    counts = torch.bincount(torch.arange(k, device=mu.device) % n_components, minlength=n_components)
    share = None if k % n_components == 0 else counts.to(mu.dtype) / k     # n_m / k; None: all 1/M
    std = torch.exp(0.5 * logvar)
    x_centered = x.flatten(1) - 0.5                                    # (n, x_dim)
    max_elements = max_elements or IW_MAX_ELEMENTS.get(mu.device.type, 2**24)
    per_chunk = max(1, max_elements // x_centered.numel())             # samples of z per decoder call
    log_sum_w = torch.full((n,), -math.inf, device=mu.device, dtype=mu.dtype)
    for start in range(0, k, per_chunk):
        eps = torch.empty(min(per_chunk, k - start), n, latent_dim, device=mu.device, dtype=mu.dtype)
        for eps_i in eps:                                  # the same draws, whatever the chunk size
            eps_i.normal_()
        component = torch.arange(start, start + len(eps), device=mu.device) % n_components
        z = mu[component] + std[component] * eps                       # (s, n, L)
        log_w = log_importance_weights(x_centered, z, decode) - log_mixture(z, mu, logvar, share)   # (s, n)
        # log Σ_i w_i, accumulated chunk by chunk: log(a + b) = logaddexp(log a, log b)
        log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
    return log_sum_w - math.log(k)                                     # log (1/k) Σ_i w_i


def log_importance_weights(x_centered, z, decode):
    """log p(x|z) + log p(z) for s samples z (s, n, latent_dim) -> (s, n): log w without its − log q(z)."""
    s, n, latent_dim = z.shape
    x_logits = decode(z.view(s * n, latent_dim))
    if x_logits.numel() != s * x_centered.numel():
        raise ValueError(f"decode returned {tuple(x_logits.shape)} logits for {s * n} samples of z and "
                         f"images of {x_centered.shape[1]} pixels: it must return one logit per pixel "
                         f"for each row of z (for a CVAE, repeat the labels: see iw_log_px)")
    return log_bernoulli_samples(x_centered, x_logits.reshape(s, n, -1)) + log_standard_normal(z)


def active_units(mu, threshold=0.01):
    """Units of z that the encoder uses: (number active, per-unit activity A_u), A_u shape (latent_dim,).

    A_u = Cov_x(E_q(z|x)[z_u]) = Var_x(μ_u(x));  u is active if A_u > threshold = 0.01   [IWAE §5.2]
    mu holds the encoder means of a whole data set, shape (n, latent_dim). An inactive unit has
    the same q(z_u|x) for every x: it carries no information about x (posterior collapse).
    """
    activity = mu.var(dim=0, correction=0)                      # population variance over x
    return int((activity > threshold).sum()), activity


def bits_per_dim(nats, x_dim=784):
    """A negative log-likelihood in nats per image (e.g. −iw_log_px) -> bits per pixel.

    bits/dim = nats / (x_dim ln 2). Works on numbers and tensors. On grey MNIST the Bernoulli
    "likelihood" is not a density (see log_bernoulli), so the number compares only with others
    computed the same way.
    """
    return nats / (x_dim * math.log(2))
