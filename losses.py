"""The evidence lower bound (ELBO) of the VAE and of the label-conditional VAE, term by term.

Papers, with the arXiv version whose equation numbers the tags below use:
  AEVB = Kingma & Welling 2013, "Auto-Encoding Variational Bayes", arXiv:1312.6114v10
  M2   = Kingma, Rezende, Mohamed & Welling 2014, "Semi-Supervised Learning with Deep
         Generative Models", arXiv:1406.5298v2 (the labelled-data bound of model M2)
  CVAE = Sohn, Lee & Yan 2015, "Learning Structured Output Representation using Deep
         Conditional Generative Models", NeurIPS 2015

Notation follows M2: x is the image, y its label, z the latent code. Sohn et al. write the same
model with the roles of the letters swapped (their x is the condition, their y the output), so
their p(y|x, z) is our p(x|y, z) and their q(z|x, y) is ours with the letters exchanged.

Every function returns one value per example (shape (n,)); the caller decides how to reduce.
All quantities are in nats. `log_px` and `elbo` are log-probabilities (<= 0 for binary x), `kl`
is a divergence (>= 0); the negated, averaged ELBO is called `loss` only where the optimiser
sees it (main.py).
"""
import torch
import torch.nn.functional as F


def log_bernoulli(x, x_logits):
    """log p(x|z) for a Bernoulli decoder, summed over the pixels.   [AEVB App. C.1]

    log p(x|z) = Σ_d x_d log σ(l_d) + (1 − x_d) log(1 − σ(l_d)),  l = decoder logits.
    Computed from the logits (log-sum-exp inside BCE-with-logits), never as log(sigmoid(l)),
    which underflows to log 0 = −inf for confident pixels.

    For grey x in [0, 1] this is the cross-entropy the PyTorch example and AEVB's MNIST runs
    optimise; it is not the log-likelihood of any distribution over grey images (a Bernoulli
    has only 0 and 1 in its support), so numbers on grey MNIST compare only with numbers
    computed the same way.
    """
    bce = F.binary_cross_entropy_with_logits(x_logits, x, reduction="none")
    return -bce.flatten(1).sum(dim=1)                                    # (n,)


def kl_to_standard_normal(mu, logvar):
    """KL(q(z|x) || p(z)) for q = N(mu, diag σ²) and p = N(0, I), summed over z.   [AEVB App. B]

    −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)    # (n,), >= 0


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
