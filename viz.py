"""Pictures of a trained model: image grids (torchvision.utils) and figures (matplotlib).

`gallery` draws every figure below that applies to a model; each figure is also a function of its
own. Every random choice (which test digits, which z, which noise) is made inside
`data.seeded`, so a figure is the same on every call and never shifts training's random stream.
Decoders return logits; the sigmoid that turns them into pixel means is applied here, where
images are drawn. Paper tags: AEVB, M2 and CVAE as in losses.py.
"""
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid, save_image

from data import EVAL_BATCH_SIZE, batches, seeded
from models import CVAE, N_CLASSES, reparameterize

PAD = 2                 # pixels between the images of a grid
CELL = 28 + PAD         # one image and its padding
DPI = 100
ZOOM = 2.5              # screen pixels per image pixel in the matplotlib figures
BATCH = EVAL_BATCH_SIZE  # images per forward pass
SCATTER_SIZE = 5000     # test images in the latent scatter


# ---------------------------------------------------------------------------------------------
# Helpers: the one place where the VAE and the CVAE differ (the label), and grid drawing
# ---------------------------------------------------------------------------------------------
def device_of(net):
    return net.enc_mu.weight.device


def encode(net, x, y):
    """(mu, logvar) of q(z|x), or of q(z|x, y) for the CVAE, in batches."""
    parts = []
    for xb, yb in batches(x, y, BATCH):
        parts.append(net.encode(xb, yb))
    return torch.cat([mu for mu, _ in parts]), torch.cat([logvar for _, logvar in parts])


def decode_means(net, z, y):
    """Pixel means σ(logits) of p(x|z), or of p(x|y, z) for the CVAE, in [0, 1]."""
    return torch.sigmoid(net.decode(z, y))


# (likelihood, posterior) by whether the model is conditional: the CVAE's both condition on y
DISTRIBUTIONS = {False: ("p(x|z)", "q(z|x)"), True: ("p(x|y, z)", "q(z|x, y)")}


def posterior_name(net):
    return DISTRIBUTIONS[isinstance(net, CVAE)][1]


def mean_name(net):
    return "E[z|x, y]" if isinstance(net, CVAE) else "E[z|x]"


def model_title(net):
    kind = "CVAE" if isinstance(net, CVAE) else "VAE"
    return f"{kind} ({net.arch}, latent {net.latent_dim})"


def random_subset(n_total, n, device, seed):
    """n indices drawn without replacement from range(n_total), seeded; all of them if n >= n_total."""
    with seeded(device, seed):
        return torch.randperm(n_total)[:n].to(device)


def centres(k):
    """Pixel coordinate of the centre of each of k cells along one side of a make_grid grid."""
    return [PAD + i * CELL + 14 for i in range(k)]


def draw_grid(ax, images, nrow, row_labels=None, col_labels=None):
    """Tile images (n, 1, 28, 28) in [0, 1], nrow per row, into ax; tick labels name rows/columns."""
    grid = make_grid(images.detach().cpu(), nrow=nrow, padding=PAD, pad_value=1.0)   # (3, H, W)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    n_rows = math.ceil(len(images) / nrow)
    ax.set_yticks(centres(n_rows) if row_labels else [], row_labels or [])
    ax.set_xticks(centres(nrow) if col_labels else [], col_labels or [])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def grid_size(n_rows, n_cols):
    """Figure size (inches) that shows a grid of n_rows x n_cols images at ZOOM, without margins."""
    return (PAD + n_cols * CELL) * ZOOM / DPI, (PAD + n_rows * CELL) * ZOOM / DPI


def grid_figure(images, nrow, title, row_labels=None, col_labels=None, xlabel=None, ylabel=None):
    """One titled grid of images in a matplotlib figure; returns (fig, ax) for extra marks."""
    width, height = grid_size(math.ceil(len(images) / nrow), nrow)
    fig, ax = figure(figsize=(width + 1.4, height + 1.1), dpi=DPI)
    draw_grid(ax, images, nrow, row_labels, col_labels)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel or "")
    ax.set_ylabel(ylabel or "")
    return fig, ax


def figure(*grid, figsize, dpi=DPI, layout=None, **subplots):
    """(fig, axes): a matplotlib Figure made without pyplot, so that importing or calling this module
    never touches the backend of a notebook or a script that imports it (a Figure saves to PNG alone)."""
    fig = Figure(figsize=figsize, dpi=dpi, layout=layout)
    return fig, fig.subplots(*grid, **subplots)


def save_figure(fig, path):
    fig.savefig(path, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# Grids of images: reconstructions, samples, samples by class
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_grid(net, x, y, path, n=24, per_row=12):
    """Pairs of rows: test digits over their reconstructions σ(decoder(μ)), μ the mean of q(z|x[, y])."""
    x, y = x[:n], y[:n]
    mu, _ = net.encode(x, y)
    x_rec = torch.sigmoid(net.decode(mu, y))
    rows = [t for i in range(0, len(x), per_row) for t in (x[i:i + per_row], x_rec[i:i + per_row])]
    save_image(torch.cat(rows).cpu(), path, nrow=per_row, padding=2, pad_value=1.0)


def sample_grid(net, path, n=80, seed=0):
    """n decodings of z ~ N(0, I); for the CVAE the labels cycle 0..9 along each row."""
    with seeded(net.enc_mu.weight.device, seed):
        y = torch.arange(n) % net.n_classes if isinstance(net, CVAE) else None
        images = net.sample(n, y)
    save_image(images.cpu(), path, nrow=10, padding=2, pad_value=1.0)


@torch.no_grad()
def samples_by_class(net, path, n_per_class=10, seed=0):
    """Row d holds samples of digit d; the columns share z, so a column is one style in ten classes."""
    device = net.enc_mu.weight.device
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_per_class, net.latent_dim, generator=g).to(device)        # one z per column
    z = z.repeat(net.n_classes, 1)                                               # (10 * n, latent)
    y = torch.arange(net.n_classes, device=device).repeat_interleave(n_per_class)
    images = torch.sigmoid(net.decode(z, y))
    save_image(images.cpu(), path, nrow=n_per_class, padding=2, pad_value=1.0)


def term_names(conditional):
    """The panel titles of loss_curves: the VAE's distributions, or the CVAE's (given y)."""
    likelihood, posterior = DISTRIBUTIONS[conditional]
    return [("neg_elbo", "−ELBO = reconstruction + KL"),
            ("recon", f"reconstruction −E_q[log {likelihood}]"),
            ("kl", f"KL({posterior} ‖ p(z))")]


SPLITS = [("train", "o-", "tab:blue"), ("val", "^-", "tab:green"), ("test", "s-", "tab:orange")]


def loss_curves(history, path, title, conditional=False):
    """−ELBO and its two terms (nats per image) against epoch, train (and val) and test, a panel each;
    conditional: the CVAE's terms, −E_q[log p(x|y, z)] and KL(q(z|x, y) ‖ p(z)).

    A line is drawn only where history has its key (train_recon, val_kl, ...): checkpoints
    written before main.py recorded the train terms show the train −ELBO alone.
    """
    long_run = len(history) > 30           # then: no markers, and a log epoch axis that shows both ends
    fig, axes = figure(1, 3, figsize=(13, 3.6), dpi=120, layout="constrained")
    for ax, (term, name) in zip(axes, term_names(conditional)):
        for split, style, colour in SPLITS:
            points = [(h["epoch"], h[f"{split}_{term}"]) for h in history if f"{split}_{term}" in h]
            if points:
                ax.plot(*zip(*points), "-" if long_run else style, color=colour, label=split)
        ax.set_title(name, fontsize=10)
        if long_run:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (log scale)" if long_run else "epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# 1. The latent space of the test set
# ---------------------------------------------------------------------------------------------
def project_2d(mu, labels, name):
    """(n, 2) coordinates of the means and the two axis names. z itself when latent_dim is 2;
    else the projection on the first two principal components of the centred means (PCA by SVD);
    for a 1-d z, z_1 against the digit."""
    if mu.shape[1] == 1:
        return torch.stack([mu[:, 0], labels.to(mu.dtype)], 1), (f"z_1 = {name}", "digit")
    if mu.shape[1] == 2:
        return mu, (f"z_1 = {name}_1", f"z_2 = {name}_2")
    centred = mu - mu.mean(0)
    _, s, v_t = torch.linalg.svd(centred, full_matrices=False)
    share = s.pow(2) / s.pow(2).sum()                        # fraction of the variance per component
    names = tuple(f"PC {k + 1} of {name} ({100 * share[k]:.0f}% of variance)" for k in range(2))
    return centred @ v_t[:2].T, names


@torch.no_grad()
def latent_space(net, x, y, path, n=SCATTER_SIZE, seed=0):
    """Means of q(z|x) (CVAE: q(z|x, y)) of n random test images, coloured by digit."""
    idx = random_subset(len(x), n, x.device, seed)
    mu, _ = encode(net, x[idx], y[idx])
    labels = y[idx].cpu()
    coords, (xlabel, ylabel) = project_2d(mu.cpu(), labels, mean_name(net))
    fig, ax = figure(figsize=(6.4, 5.2), dpi=DPI)
    points = ax.scatter(coords[:, 0], coords[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=N_CLASSES - 0.5,
                        s=4, alpha=0.7)
    fig.colorbar(points, ax=ax, ticks=range(N_CLASSES), label="digit")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{model_title(net)}: means of {posterior_name(net)}, {len(idx)} test digits", fontsize=10)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# 2. The learned manifold of a 2-d latent space   [AEVB Fig. 4]
# ---------------------------------------------------------------------------------------------
def gaussian_grid(n):
    """n values of one coordinate of z: a regular grid on (0, 1) mapped through the inverse
    Gaussian CDF Φ⁻¹, so that the grid covers p(z) = N(0, 1) evenly in probability.   [AEVB Fig. 4]"""
    return torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))


@torch.no_grad()
def manifold_images(net, n, label=None):
    """Decodings of the n x n grid of z, row-major: z_1 grows to the right, z_2 upwards."""
    z1, z2 = gaussian_grid(n), gaussian_grid(n).flip(0)
    rows, cols = torch.meshgrid(z2, z1, indexing="ij")
    z = torch.stack([cols, rows], -1).reshape(-1, 2).to(device_of(net))       # (n * n, 2)
    y = None if label is None else torch.full((len(z),), label, device=z.device)
    return decode_means(net, z, y)


def label_manifold_axes(ax, n):
    """Ticks at the first, middle and last cell of an n x n manifold grid, with their z values."""
    z_max = gaussian_grid(n)[-1].item()
    ends = centres(n)[0], centres(n)[-1]
    ticks, labels = [ends[0], sum(ends) / 2, ends[1]], [f"{-z_max:.2f}", "0", f"{z_max:.2f}"]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels[::-1])
    ax.set_xlabel("z_1 = Φ⁻¹(u_1)")
    ax.set_ylabel("z_2 = Φ⁻¹(u_2)")


def manifold(net, path, n=20, n_cvae=10):
    """The decoder's images over a grid of z in a 2-d latent space; only for latent_dim == 2.

    VAE: one n x n grid. CVAE: one n_cvae x n_cvae grid for each digit 0-9 (2 rows of 5), the
    same z in each, so the same place holds the same style (slant, width) in every digit.
    """
    cvae = isinstance(net, CVAE)
    labels, k = (range(net.n_classes), n_cvae) if cvae else ([None], n)
    shape, size = ((2, net.n_classes // 2), (16, 7.4)) if cvae else ((1, 1), (8.6, 8.6))
    fig, axes = figure(*shape, figsize=size, dpi=DPI, squeeze=False, layout="constrained")
    for label, ax in zip(labels, axes.flat):
        draw_grid(ax, manifold_images(net, k, label), k)
        label_manifold_axes(ax, k)
        ax.set_title(f"y = {label}" if cvae else "", fontsize=10)
    fig.suptitle(f"{model_title(net)}: decoder means on a grid of z, u in linspace(0.05, 0.95)"
                 + (", one panel per label y" if cvae else ""))
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# 3. Interpolations between the codes of two test digits
# ---------------------------------------------------------------------------------------------
def pick_pairs(y, n_pairs, same_label, seed):
    """n_pairs index pairs (a, b) of distinct test digits, seeded; b has a's label when same_label."""
    with seeded(y.device, seed):
        order = torch.randperm(len(y))
    labels = y.cpu()
    starts, rest = order[:n_pairs], order[n_pairs:]
    ends = []
    for k, a in enumerate(starts):
        match = rest[labels[rest] == labels[a]] if same_label else rest
        ends.append(match[k % len(match)] if len(match) else a)
    return starts.to(y.device), torch.stack(ends).to(y.device)


@torch.no_grad()
def interpolations(net, x, y, path, n_pairs=8, n_steps=11, seed=0):
    """Rows: pairs of test digits; between them, decodings of z = (1 − t) E[z|x_a] + t E[z|x_b].
    The CVAE's pairs share a label and are decoded with it."""
    cvae = isinstance(net, CVAE)
    a, b = pick_pairs(y, min(n_pairs, len(y) // 2), same_label=cvae, seed=seed)
    mu_a, mu_b = encode(net, x[a], y[a])[0], encode(net, x[b], y[b])[0]
    t = torch.linspace(0, 1, n_steps, device=mu_a.device)
    z = (1 - t)[None, :, None] * mu_a[:, None] + t[None, :, None] * mu_b[:, None]   # (pairs, steps, latent)
    decoded = decode_means(net, z.flatten(0, 1), y[a].repeat_interleave(n_steps))
    decoded = decoded.view(len(a), n_steps, *x.shape[1:])
    images = torch.cat([x[a, None], decoded, x[b, None]], 1).flatten(0, 1)
    fig, ax = grid_figure(images, n_steps + 2, f"{model_title(net)}: decoding the straight line between "
                          f"the means of {posterior_name(net)}" + (" (same label)" if cvae else ""),
                          row_labels=[f"{i} → {j}" for i, j in zip(y[a].tolist(), y[b].tolist())],
                          col_labels=["x_a"] + [f"{s:.1f}" for s in t.tolist()] + ["x_b"],
                          xlabel="t", ylabel="test digits")
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# 4. CVAE analogies: one style, every label   [M2 Fig. 1]
# ---------------------------------------------------------------------------------------------
def one_per_class(y, n_classes, seed):
    """The index of one random test digit of each class present, in class order, seeded."""
    with seeded(y.device, seed):
        order = torch.randperm(len(y))
    labels = y.cpu()[order]
    return torch.stack([order[labels == d][0] for d in range(n_classes) if (labels == d).any()]).to(y.device)


@torch.no_grad()
def analogy_images(net, x, y):
    """Pixel means of p(x|y = d, z_i) for z_i = E[z|x_i, y_i] and every label d:
    (n, n_classes, 1, 28, 28); row i is the style of x_i drawn as each digit."""
    mu, _ = net.encode(x, y)
    z = mu.repeat_interleave(net.n_classes, dim=0)                          # (n * n_classes, latent)
    labels = torch.arange(net.n_classes, device=mu.device).repeat(len(x))   # 0..9, 0..9, ...
    return decode_means(net, z, labels).view(len(x), net.n_classes, *x.shape[1:])


def analogies(net, x, y, path, seed=0):
    """CVAE only. Row i: a test digit of class i (left) and its style decoded with labels 0-9."""
    idx = one_per_class(y, net.n_classes, seed)
    images = torch.cat([x[idx, None], analogy_images(net, x[idx], y[idx])], 1).flatten(0, 1)
    fig, ax = grid_figure(images, net.n_classes + 1,
                          f"{model_title(net)} analogies: z = E[z|x, y] of a test digit, decoded with each y",
                          row_labels=[str(d) for d in y[idx].tolist()],
                          col_labels=["x"] + [str(d) for d in range(net.n_classes)],
                          xlabel="label y given to p(x|y, z)", ylabel="test digit x (its label)")
    ax.axvline(CELL + PAD / 2, color="tab:red", linewidth=1.5)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# 5. Latent traversals, dimensions ordered by how much information they carry
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def traversal_images(net, x, y, dims, offsets):
    """For one image x (1, 1, 28, 28): row r decodes E[z|x] with z_dims[r] moved by each offset."""
    mu, _ = encode(net, x, y)
    z = mu.expand(len(dims), len(offsets), -1).clone()                     # (rows, steps, latent)
    z[torch.arange(len(dims))[:, None], torch.arange(len(offsets)), dims[:, None]] += offsets
    return decode_means(net, z.flatten(0, 1), y.expand(z.shape[0] * z.shape[1]))


def latent_traversals(net, x, y, path, kl_per_dim, n_digits=3, n_dims=10, n_steps=9, span=3.0, seed=0):
    """For n_digits random test digits: each row moves one z_j from E[z_j|x] − span to + span
    (prior standard deviations), the others held at E[z|x]; rows are the n_dims dimensions with
    the largest KL_j, most informative first. kl_per_dim: the test-set mean KL(q(z_j|x) || N(0, 1))
    per dimension, the numbers of kl_per_dim.png (main.latent_diagnostics computes both)."""
    kl = torch.as_tensor(kl_per_dim)
    dims = kl.argsort(descending=True)[:n_dims].to(x.device)
    offsets = torch.linspace(-span, span, n_steps, device=x.device)
    idx = random_subset(len(x), n_digits, x.device, seed)
    width, height = grid_size(len(dims), n_steps)
    fig, axes = figure(1, len(idx), figsize=(len(idx) * (0.6 * width + 0.3) + 1.3, 0.6 * height + 1.4),
                             dpi=DPI, squeeze=False, layout="constrained")
    row_labels = [f"z_{j + 1}  KL {kl[j]:.2f}" for j in dims.tolist()]          # z_1 is dimension 0
    col_labels = [f"{s:+.1f}" if k % 2 == 0 else "" for k, s in enumerate(offsets.tolist())]
    for panel, (i, ax) in enumerate(zip(idx, axes[0])):
        images = traversal_images(net, x[i:i + 1], y[i:i + 1], dims, offsets)
        draw_grid(ax, images, n_steps, row_labels if panel == 0 else None, col_labels)
        ax.set_title(f"test digit {y[i].item()}", fontsize=10)
        ax.set_xlabel(f"z_j − {mean_name(net)}_j", fontsize=9)
    fig.suptitle(f"{model_title(net)}: one latent dimension varied at a time, the centre column at z = "
                 f"{mean_name(net)};\nrows: the dimension and its mean KL (nats), largest first", fontsize=10)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# 6. Completing occluded digits by iterated sampling (Sohn et al.'s MNIST task, as imputation)
# ---------------------------------------------------------------------------------------------
def bottom_half_hidden(x):
    """True on the pixels to fill in: the bottom 14 of the 28 rows."""
    hidden = torch.zeros_like(x, dtype=torch.bool)
    hidden[..., 14:, :] = True
    return hidden


@torch.no_grad()
def complete(encode, decode, x, hidden, steps, start="noise", pixels="means"):
    """Fill in the pixels of x where `hidden` is True; the observed pixels stay exactly as in x.

    Start the hidden pixels at uniform noise (start="noise") or at 0 ("zeros"), then repeat:
    z ~ q(z|x̂), and x̂_hidden ← the decoder's pixel means σ(l(z)) (pixels="means") or a draw
    ~ Bernoulli(σ(l(z))) ("samples"). With drawn pixels a pseudo-Gibbs chain whose x̂ approximate
    p(x_hidden|x_observed) [Rezende, Mohamed & Wierstra 2014, arXiv:1401.4082]; with means the
    step is deterministic where a Gibbs sampler would draw, so a completion is a mean image of
    p(x_hidden|z) for the chain's last z. encode(x) -> (mu, logvar), decode(z) -> logits: bind
    the CVAE's labels in them. Random: call it inside models.seeded.
    """
    x_hat = torch.where(hidden, torch.rand_like(x) if start == "noise" else torch.zeros_like(x), x)
    for _ in range(steps):
        z = reparameterize(*encode(x_hat))
        means = torch.sigmoid(decode(z).view_as(x))
        x_hat = torch.where(hidden, torch.bernoulli(means) if pixels == "samples" else means, x)
    return x_hat


def completions(net, x, y, path, n_samples=5, n_iters=50, seed=0):
    """One test digit per class with its bottom half hidden; n_samples completions of each."""
    idx = one_per_class(y, N_CLASSES, seed)
    x_rep, y_rep = x[idx].repeat_interleave(n_samples, 0), y[idx].repeat_interleave(n_samples)
    hidden = bottom_half_hidden(x_rep)
    with seeded(x.device, seed):
        filled = complete(lambda v: net.encode(v, y_rep), lambda z: net.decode(z, y_rep), x_rep, hidden, n_iters)
    filled = filled.view(len(idx), n_samples, *x.shape[1:])
    shown = torch.where(bottom_half_hidden(x[idx]), torch.full_like(x[idx], 0.5), x[idx])   # grey = hidden
    images = torch.cat([x[idx, None], shown[:, None], filled], 1).flatten(0, 1)
    given = " and its label" if isinstance(net, CVAE) else ""
    fig, ax = grid_figure(images, n_samples + 2,
                          f"{model_title(net)}: the bottom half filled in from the top half{given},\n"
                          f"{n_iters} steps of z ~ {posterior_name(net)}, hidden pixels from noise ← decoder means",
                          row_labels=[str(d) for d in y[idx].tolist()],
                          col_labels=["original", "input"] + [str(k + 1) for k in range(n_samples)],
                          xlabel="completions from independent chains", ylabel="test digit")
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# 7. Anomaly scores: which test digits does the model find least likely? The score of an image is
# its −ELBO, computed by main.evaluate, whose mean is the test −ELBO main.py reports.
# ---------------------------------------------------------------------------------------------
def anomaly_histogram(net, scores, path, n_marked):
    """Histogram of the scores, with their mean and the score of the n_marked-th least likely."""
    fig, ax = figure(figsize=(6.4, 4), dpi=DPI)
    ax.hist(scores.cpu().numpy(), bins=100, color="tab:blue")
    ax.set_yscale("log")
    ax.axvline(scores.mean().item(), color="black", linestyle="--", label=f"mean {scores.mean():.1f}")
    threshold = scores.topk(min(n_marked, len(scores))).values[-1].item()
    ax.axvline(threshold, color="tab:red", linestyle=":", label=f"{n_marked} least likely ≥ {threshold:.0f}")
    ax.set_xlabel("−ELBO (nats per image)")
    ax.set_ylabel("test images (log scale)")
    ax.set_title(f"{model_title(net)}: −ELBO of each of {len(scores)} test digits", fontsize=10)
    ax.legend()
    save_figure(fig, path)


def least_likely_grid(net, x, y, scores, path, n, per_row=8):
    """The n images with the highest score, each marked with its label and score."""
    worst = scores.topk(min(n, len(scores))).indices
    fig, ax = grid_figure(x[worst], per_row, f"{model_title(net)}: the {len(worst)} test digits with the "
                          "highest −ELBO (label: −ELBO in nats)")
    for k, i in enumerate(worst.tolist()):
        ax.text(PAD + (k % per_row) * CELL, PAD + (k // per_row) * CELL, f"{y[i].item()}: {scores[i]:.0f}",
                color="yellow", fontsize=7, va="top")
    save_figure(fig, path)


def anomalies(net, x, y, scores, histogram_path, grid_path, n=32):
    """The histogram of the per-image test −ELBO `scores`, and a grid of the n test digits with the highest."""
    scores = torch.as_tensor(scores).cpu()
    anomaly_histogram(net, scores, histogram_path, n)
    least_likely_grid(net, x.cpu(), y.cpu(), scores, grid_path, n)


def kl_bars(kl_per_dim, unit_variance, path, title, threshold=0.01):
    """KL(q(z_j|x) || p(z_j)) per latent dimension (test mean), active units [IWAE §5.2] marked."""
    active = [v > threshold for v in unit_variance]
    fig, ax = figure(figsize=(max(4.0, 0.16 * len(kl_per_dim) + 1.5), 3.2), dpi=120)
    ax.bar(range(1, len(kl_per_dim) + 1), kl_per_dim, color=["C0" if a else "C7" for a in active])
    ax.set_xlabel("latent dimension j (grey: inactive, Var_x E[z_j] <= 0.01)")
    ax.set_ylabel("KL per image (nats)")
    ax.set_title(f"{title}: {sum(active)} of {len(active)} units active", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Every figure at once
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def gallery(net, x, y, history, run_dir, seed, kl_per_dim, scores):
    """Write every figure that applies to `net` into run_dir; returns the paths written.
    kl_per_dim: the test-set KL per latent dimension (orders the traversals); scores: the −ELBO of
    each image of x (the anomaly figures); main.py computes both once for its report and pictures.

    Always: latent_space, interpolations, traversals, completions, anomaly_histogram,
    least_likely; manifold when latent_dim is 2; analogies for the CVAE; loss_curves when
    history is not empty. All .png.
    """
    run_dir, paths = Path(run_dir), []

    def path(name):
        paths.append(run_dir / name)
        return paths[-1]

    net.eval()
    latent_space(net, x, y, path("latent_space.png"), seed=seed)
    if net.latent_dim == 2:
        manifold(net, path("manifold.png"))
    interpolations(net, x, y, path("interpolations.png"), seed=seed)
    if isinstance(net, CVAE):
        analogies(net, x, y, path("analogies.png"), seed=seed)
    latent_traversals(net, x, y, path("traversals.png"), kl_per_dim, seed=seed)
    completions(net, x, y, path("completions.png"), seed=seed)
    anomalies(net, x, y, scores, path("anomaly_histogram.png"), path("least_likely.png"))
    if history:
        loss_curves(history, path("loss_curves.png"), model_title(net) + ", MNIST", isinstance(net, CVAE))
    return paths


def draw_run(net, x, y, history, report, scores, run_dir, seed):
    """Every picture of a trained or evaluated model into run_dir: the three grids, samples by class
    for the CVAE, the gallery above, the KL per dimension. report: the run's final report (its
    kl_per_dim orders the traversals, its unit_variance marks the active units); scores: the −ELBO
    of each image of x, the anomaly pictures' scores."""
    run_dir = Path(run_dir)
    net.eval()
    reconstruction_grid(net, x, y, run_dir / "reconstructions.png")
    sample_grid(net, run_dir / "samples.png", seed=seed)
    sample_grid(net, run_dir / "samples_10.png", n=10, seed=seed)     # 10 z ~ N(0, I) in one row
    if isinstance(net, CVAE):
        samples_by_class(net, run_dir / "samples_by_class.png", seed=seed)
    gallery(net, x, y, history, run_dir, seed, report["kl_per_dim"], scores)
    kl_bars(report["kl_per_dim"], report["unit_variance"], run_dir / "kl_per_dim.png", model_title(net))
