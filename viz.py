"""Pictures of a trained model: image grids (torchvision.utils) and curves (matplotlib)."""
import matplotlib

matplotlib.use("Agg")   # files only, no display needed
import matplotlib.pyplot as plt
import torch
from torchvision.utils import save_image

from models import CVAE, seeded


@torch.no_grad()
def reconstruction_grid(net, x, y, path, n=24, per_row=12):
    """Pairs of rows: test digits over their reconstructions σ(decoder(μ)), μ the mean of q(z|x[, y])."""
    x, y = x[:n], y[:n]
    if isinstance(net, CVAE):
        mu, _ = net.encode(x, y)
        x_rec = torch.sigmoid(net.decode(mu, y))
    else:
        mu, _ = net.encode(x)
        x_rec = torch.sigmoid(net.decode(mu))
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


def loss_curves(history, path, title):
    """Train and test −ELBO (nats per image) against epoch."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(epochs, [h["train_neg_elbo"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["test_neg_elbo"] for h in history], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("−ELBO (nats per image)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
