"""The shipped checkpoints through torch.hub, each an entry point that returns a trained model,
in eval mode, ready to `sample`:

    net = torch.hub.load("path/to/this/clone", "cvae_mlp", source="local")
    digits = net.sample(10, torch.arange(10))          # (10, 1, 28, 28), pixel means in [0, 1]

RESULTS.md says how each was trained and what it scores.
"""
import pathlib

import runs

dependencies = ["torch"]

CHECKPOINTS = pathlib.Path(__file__).resolve().parent / "checkpoints"


def _load(name, map_location):
    return runs.read_checkpoint(CHECKPOINTS / name, map_location)[0]


def cvae_mlp(map_location="cpu"):
    """The default run's CVAE on grey MNIST: MLP 794-400-2, 2-d z (checkpoints/cvae-mlp-default.pt)."""
    return _load("cvae-mlp-default.pt", map_location)


def cvae_mlp_binarized(map_location="cpu"):
    """The CVAE on binarized MNIST, IWAE's MLP (2 x 200 tanh, 50-d z): checkpoints/cvae-mlp-binarized.pt."""
    return _load("cvae-mlp-binarized.pt", map_location)


def vae_mlp_binarized(map_location="cpu"):
    """The VAE on binarized MNIST, IWAE's MLP (2 x 200 tanh, 50-d z): checkpoints/vae-mlp-binarized.pt."""
    return _load("vae-mlp-binarized.pt", map_location)


def vae_conv_binarized(map_location="cpu"):
    """The conv VAE on binarized MNIST (32-64 channels, 256 dense, 50-d z): checkpoints/vae-conv-binarized.pt."""
    return _load("vae-conv-binarized.pt", map_location)
