"""VAE and label-conditional VAE (CVAE) for 28x28 MNIST, each with an MLP or a conv body.

  VAE:   q(z|x) = N(mu(x), diag σ²(x)),        p(z) = N(0, I),  p(x|z)    = Bernoulli(σ(logits(z)))
  CVAE:  q(z|x, y) = N(mu(x, y), diag σ²(x, y)), p(z) = N(0, I),  p(x|y, z) = Bernoulli(σ(logits(z, y)))

Paper tags (AEVB, M2, CVAE) are defined in losses.py. Decoders return Bernoulli logits of
shape (n, 1, 28, 28); a sigmoid appears only in `sample`, where images are made.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_SHAPE = (1, 28, 28)
X_DIM = 28 * 28
N_CLASSES = 10
DEFAULT_HIDDEN_DIM = {"mlp": 400, "conv": 500}   # AEVB's MNIST MLP / configuration B's conv dense layer
DEFAULT_CONV_CHANNELS = (32, 64, 128)            # configuration B's conv layers (configs/b-conv-vae.args)
# Conv checkpoints written before the channels were a flag hold no "conv_channels": they were
# built with (32, 64), which read_checkpoint therefore takes when none is stored.
LEGACY_CONV_CHANNELS = (32, 64)


# ---------------------------------------------------------------------------------------------
# Bodies: the networks between the input and the Gaussian heads, and between z and the logits.
# `label_dim` is the size of the one-hot label joined to the encoder input: 0 for the VAE, 10
# for the CVAE (10 extra inputs to the MLP, 10 extra input planes to the conv net).
# `hidden_layers` dense layers of `hidden_dim` units each: 1 is AEVB's MNIST model, 2 with tanh
# and 200 units is IWAE's (784-200-200-50).
# ---------------------------------------------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def dense_stack(in_dim, hidden_dim, hidden_layers, activation):
    """hidden_layers x (Linear -> activation), the first from in_dim, the rest hidden_dim wide."""
    dims = [in_dim] + [hidden_dim] * hidden_layers
    layers = [[nn.Linear(d_in, d_out), ACTIVATIONS[activation]()] for d_in, d_out in zip(dims, dims[1:])]
    return [module for pair in layers for module in pair]


def mlp_encoder(hidden_dim, label_dim=0, hidden_layers=1, activation="relu"):
    """x (n, 1, 28, 28), or (n, 784 + label_dim) flat -> h (n, hidden_dim)."""
    return nn.Sequential(nn.Flatten(), *dense_stack(X_DIM + label_dim, hidden_dim, hidden_layers, activation))


def mlp_decoder(in_dim, hidden_dim, hidden_layers=1, activation="relu"):
    """z (n, in_dim) -> x_logits (n, 1, 28, 28)."""
    return nn.Sequential(
        *dense_stack(in_dim, hidden_dim, hidden_layers, activation),
        nn.Linear(hidden_dim, X_DIM), nn.Unflatten(1, IMAGE_SHAPE),
    )


def conv_layers(channels, activation, transposed=False):
    """The conv stack of `channels` (c_0 = input planes, c_1, ..., c_L), or its mirror image.

    The first two layers have stride 2 (4x4 kernels: 28 -> 14 -> 7), any further one stride 1
    (3x3 kernels, 7 -> 7), so every body ends on 7x7 maps. transposed=True builds the decoder's
    mirror: c_L -> ... -> c_0 with transposed convolutions, the same stride at the same depth,
    and no activation after the last layer (it outputs logits)."""
    shapes = [(c_in, c_out, 4 if i < 2 else 3, 2 if i < 2 else 1, 1)       # (in, out, kernel, stride, pad)
              for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]))]
    if transposed:
        shapes = [(c_out, c_in, k, s, p) for c_in, c_out, k, s, p in reversed(shapes)]
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers = []
    for c_in, c_out, k, s, p in shapes:
        layers += [conv(c_in, c_out, k, stride=s, padding=p), ACTIVATIONS[activation]()]
    return layers[:-1] if transposed else layers


def conv_encoder(hidden_dim, label_dim=0, hidden_layers=1, activation="relu", channels=DEFAULT_CONV_CHANNELS):
    """x (n, 1 + label_dim, 28, 28) -> h (n, hidden_dim): the conv stack (28 -> 14 -> 7 -> ... 7),
    then dense layers. Source B's encoder: channels (32, 64, 128), one dense layer of 500."""
    return nn.Sequential(
        *conv_layers((1 + label_dim, *channels), activation),                 # (n, c_L, 7, 7)
        nn.Flatten(), *dense_stack(channels[-1] * 7 * 7, hidden_dim, hidden_layers, activation),
    )


def conv_decoder(in_dim, hidden_dim, hidden_layers=1, activation="relu", channels=DEFAULT_CONV_CHANNELS):
    """z (n, in_dim) -> x_logits (n, 1, 28, 28): the encoder mirrored with transposed convolutions.
    The decoder runs K times per image in the K = 5000 likelihood estimate: with channels (32, 64)
    and 256 units, about 2.5 million multiply-adds per z; configuration B's (32, 64, 128) and 500, 13 million."""
    return nn.Sequential(
        *dense_stack(in_dim, hidden_dim, hidden_layers, activation),
        nn.Linear(hidden_dim, channels[-1] * 7 * 7), ACTIVATIONS[activation](),
        nn.Unflatten(1, (channels[-1], 7, 7)),                                # (n, c_L, 7, 7)
        *conv_layers((1, *channels), activation, transposed=True),            # (n, 1, 28, 28) logits
    )


BODIES = {"mlp": (mlp_encoder, mlp_decoder), "conv": (conv_encoder, conv_decoder)}


def reparameterize(mu, logvar):
    """z = μ + σ ⊙ ε with ε ~ N(0, I): a sample of q(z|·) that gradients flow through.   [AEVB §2.4]"""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + std * eps


@contextlib.contextmanager
def seeded(device, seed):
    """Random numbers on `device` start from `seed` inside; outside, the global random state is as
    it was, so seeded evaluation and pictures never shift the training run's random stream."""
    # on CUDA, MPS, XPU, ...: fork that device's stream too; on the CPU only the CPU's
    forked = {"devices": [device], "device_type": device.type} if device.type != "cpu" else {"devices": []}
    with torch.random.fork_rng(**forked):
        torch.manual_seed(seed)
        yield


def body_args(arch, hidden_layers, activation, conv_channels):
    """The keyword arguments of the arch's encoder and decoder, checked; conv_channels is
    (c_1, ..., c_L) for the conv body, at least two layers to reach 7x7; the MLP ignores it."""
    if arch not in BODIES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {sorted(BODIES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
    body = {"hidden_layers": hidden_layers, "activation": activation}
    if arch == "mlp":
        return body
    if not conv_channels or len(conv_channels) < 2 or min(conv_channels) < 1:
        raise ValueError(f"conv_channels {conv_channels!r}: give two or more positive channel counts, e.g. (32, 64, 128)")
    return {**body, "channels": tuple(conv_channels)}


# ---------------------------------------------------------------------------------------------
# The two models. Same shape of code; the CVAE's label enters visibly in encode and decode.
# ---------------------------------------------------------------------------------------------
class VAE(nn.Module):
    def __init__(self, arch="mlp", latent_dim=20, hidden_dim=400, hidden_layers=1, activation="relu",
                 conv_channels=DEFAULT_CONV_CHANNELS):
        super().__init__()
        body = body_args(arch, hidden_layers, activation, conv_channels)
        make_encoder, make_decoder = BODIES[arch]
        self.arch, self.latent_dim, self.hidden_dim = arch, latent_dim, hidden_dim
        self.hidden_layers, self.activation = hidden_layers, activation
        self.conv_channels = body.get("channels")                       # None for the MLP
        self.encoder = make_encoder(hidden_dim, **body)
        self.enc_mu = nn.Linear(hidden_dim, latent_dim)        # mean of q(z|x)
        self.enc_logvar = nn.Linear(hidden_dim, latent_dim)    # log σ² of q(z|x)
        self.decoder = make_decoder(latent_dim, hidden_dim, **body)    # logits of p(x|z)

    # The VAE has no label. Its methods take `y=None` and ignore it only so that code driving
    # either model (training, evaluation, pictures) can call net.encode(x, y) alike.
    def encode(self, x, y=None):
        """q(z|x): x (n, 1, 28, 28) in [0, 1] -> (mu, logvar), each (n, latent_dim)."""
        h = self.encoder(x)
        return self.enc_mu(h), self.enc_logvar(h)

    def decode(self, z, y=None):
        """p(x|z): z (n, latent_dim) -> x_logits (n, 1, 28, 28)."""
        return self.decoder(z)

    def forward(self, x, y=None):
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n, y=None):
        """n images from p(x) = ∫ p(x|z) p(z) dz, shown as pixel means σ(logits) in [0, 1]."""
        if y is not None:       # asking the VAE for a chosen digit is a mistake worth stopping
            raise ValueError("the VAE has no label, so it cannot draw a chosen digit: call sample(n), "
                             "or use a CVAE (e.g. checkpoints/cvae-mlp-default.pt)")
        z = torch.randn(n, self.latent_dim, device=self.enc_mu.weight.device)
        return torch.sigmoid(self.decode(z))


class CVAE(nn.Module):
    def __init__(self, arch="mlp", latent_dim=20, hidden_dim=400, hidden_layers=1, activation="relu",
                 conv_channels=DEFAULT_CONV_CHANNELS, n_classes=N_CLASSES):
        super().__init__()
        body = body_args(arch, hidden_layers, activation, conv_channels)
        make_encoder, make_decoder = BODIES[arch]
        self.arch, self.latent_dim, self.hidden_dim = arch, latent_dim, hidden_dim
        self.hidden_layers, self.activation = hidden_layers, activation
        self.conv_channels = body.get("channels")                       # None for the MLP
        self.n_classes = n_classes
        self.encoder = make_encoder(hidden_dim, label_dim=n_classes, **body)    # sees x and y
        self.enc_mu = nn.Linear(hidden_dim, latent_dim)                 # mean of q(z|x, y)
        self.enc_logvar = nn.Linear(hidden_dim, latent_dim)             # log σ² of q(z|x, y)
        self.decoder = make_decoder(latent_dim + n_classes, hidden_dim, **body)  # logits of p(x|y, z)

    def one_hot(self, y):
        return F.one_hot(y, self.n_classes).float()                     # (n, n_classes)

    def encode(self, x, y):
        """q(z|x, y): the one-hot label is concatenated to the encoder's input."""
        y_onehot = self.one_hot(y).to(x.dtype)
        if self.arch == "mlp":   # 784 pixels + 10 label inputs
            xy = torch.cat([x.flatten(1), y_onehot], dim=1)                        # (n, 794)
        else:                    # the label as 10 constant 28x28 planes beside the pixels
            planes = y_onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])
            xy = torch.cat([x, planes], dim=1)                                     # (n, 11, 28, 28)
        h = self.encoder(xy)
        return self.enc_mu(h), self.enc_logvar(h)

    def decode(self, z, y):
        """p(x|y, z): the one-hot label is concatenated to z."""
        zy = torch.cat([z, self.one_hot(y).to(z.dtype)], dim=1)        # (n, latent_dim + 10)
        return self.decoder(zy)

    def forward(self, x, y):
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar)
        return self.decode(z, y), mu, logvar

    @torch.no_grad()
    def sample(self, n, y=None):
        """n images from p(x|y); y is a LongTensor of n labels, e.g. torch.full((n,), 7)."""
        if y is None:
            raise ValueError("CVAE.sample needs the labels to draw: sample(n, y=torch.full((n,), 7))")
        device = self.enc_mu.weight.device
        y = torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1)
        if len(y) != n:
            raise ValueError(f"CVAE.sample got {len(y)} labels for n={n} images: pass one label per image")
        z = torch.randn(n, self.latent_dim, device=device)
        return torch.sigmoid(self.decode(z, y))


MODELS = {"vae": VAE, "cvae": CVAE}


def build_model(model, arch, latent_dim, hidden_dim, hidden_layers=1, activation="relu",
                conv_channels=DEFAULT_CONV_CHANNELS):
    """The model named `model` ('vae' or 'cvae'); hidden_dim 0 means the arch's default.
    conv_channels is used by the conv arch only (main.py passes --conv-channels)."""
    hidden_dim = hidden_dim or DEFAULT_HIDDEN_DIM[arch]
    net = MODELS[model](arch=arch, latent_dim=latent_dim, hidden_dim=hidden_dim, hidden_layers=hidden_layers,
                        activation=activation, conv_channels=conv_channels)
    # Convolution weights stored channels-last (NHWC): oneDNN then runs every convolution in that
    # layout, 1.3x faster to train and 1.4x faster to evaluate on this project's CPU. The same
    # function up to float rounding (tests/test_models.py compares it with the NCHW layout).
    return net.to(memory_format=torch.channels_last) if arch == "conv" else net


FUSED_ADAM_DEVICES = {"cpu", "cuda", "mps", "xpu", "hpu"}     # where torch.optim.Adam has a fused kernel


def make_optimizer(net, lr, eps):
    """Adam; the fused kernel updates all parameters in one call (about 10% of a CPU epoch saved),
    on the devices that have one; elsewhere the default (foreach) implementation."""
    # fused=None (not False) elsewhere: False would force the slow per-parameter loop
    fused = True if next(net.parameters()).device.type in FUSED_ADAM_DEVICES else None
    return torch.optim.Adam(net.parameters(), lr=lr, eps=eps, fused=fused)


def model_args(net):
    """The arguments that rebuild `net` with build_model, stored in every checkpoint."""
    kind = "cvae" if isinstance(net, CVAE) else "vae"
    return {"model": kind, "arch": net.arch, "latent_dim": net.latent_dim, "hidden_dim": net.hidden_dim,
            "hidden_layers": net.hidden_layers, "activation": net.activation,
            "conv_channels": list(net.conv_channels) if net.conv_channels else None}


class ArchitectureMismatch(ValueError):
    """A checkpoint's tensors do not fit the model its model_args describe."""


def load_state(net, state):
    """net.load_state_dict(state), with an error that names the tensors whose shapes differ."""
    own = net.state_dict()
    differ = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if differ or missing or extra:
        raise ArchitectureMismatch("the checkpoint holds another architecture: "
                         + "; ".join(differ[:3] + [f"missing {missing[:3]}"] * bool(missing)
                                     + [f"unexpected {extra[:3]}"] * bool(extra))
                         + " (checkpoint vs model)")
    net.load_state_dict(state)


def load_checkpoint(path, map_location="cpu"):
    """The trained model stored in a checkpoint written by main.py, in eval mode, ready to sample."""
    return read_checkpoint(path, map_location)[0]


def read_checkpoint(path, map_location="cpu"):
    """(model in eval mode, the checkpoint dict): the one reader of main.py's checkpoints."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    net = build_model(**{"conv_channels": LEGACY_CONV_CHANNELS, **ckpt["model_args"]})
    load_state(net, ckpt["model"])
    device = next(iter(ckpt["model"].values())).device     # wherever map_location put the weights
    return net.to(device).eval(), ckpt


class DigitClassifier(nn.Module):
    """A small convnet that labels MNIST digits (99.16% on the test set after the 4 epochs of
    judge.train_classifier).

    Not part of any VAE: it is the judge of the CVAE, telling which digit a sample p(x|y) shows.
    """
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),          # (n, 32, 13, 13)
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),         # (n, 64, 5, 5)
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, N_CLASSES),
        )

    def forward(self, x):
        return self.net((x - 0.1307) / 0.3081)     # MNIST's pixel mean and std; class logits (n, 10)
