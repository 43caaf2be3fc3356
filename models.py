"""VAE and label-conditional VAE (CVAE) for 28x28 MNIST, each with an MLP or a conv body.

  VAE:   q(z|x) = N(mu(x), diag σ²(x)),        p(z) = N(0, I),  p(x|z)    = Bernoulli(σ(logits(z)))
  CVAE:  q(z|x, y) = N(mu(x, y), diag σ²(x, y)), p(z) = N(0, I),  p(x|y, z) = Bernoulli(σ(logits(z, y)))

Paper tags (AEVB, M2, CVAE) are defined in losses.py. Decoders return Bernoulli logits of
shape (n, 1, 28, 28); a sigmoid appears only in `sample`, where images are made.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_SHAPE = (1, 28, 28)
X_DIM = 28 * 28
N_CLASSES = 10
DEFAULT_HIDDEN_DIM = {"mlp": 400, "conv": 500}   # the PyTorch example's MLP / the published conv VAE's dense layer
DEFAULT_CONV_CHANNELS = (32, 64, 128)            # that conv VAE's conv layers (configs/b-conv-vae.args)
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def reparameterize(mu, logvar):
    """z = μ + σ ⊙ ε with ε ~ N(0, I): a sample of q(z|·) that gradients flow through.   [AEVB §2.4]"""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + std * eps


# ---------------------------------------------------------------------------------------------
# The two models. Same shape of code; the CVAE's label enters visibly in encode and decode.
# Sizes for the default MLP: x 784 -> h 400 -> z 20 -> h 400 -> x_logits 784 (the PyTorch example's;
# AEVB's MNIST MLP had 500 hidden units: hidden_dim 500);
# hidden_dim 0 takes the arch's default (mlp 400, conv 500), hidden_layers 2, tanh, 200 units and
# latent_dim 50 is IWAE's 784-200-200-50. The bodies (encoder_body, decoder_body) follow the models.
# ---------------------------------------------------------------------------------------------
class VAE(nn.Module):
    def __init__(self, arch="mlp", latent_dim=20, hidden_dim=0, hidden_layers=1, activation="relu",
                 conv_channels=DEFAULT_CONV_CHANNELS):
        super().__init__()
        hidden_dim = keep_arguments(self, arch, latent_dim, hidden_dim, hidden_layers, activation, conv_channels)
        body = (arch, hidden_dim, hidden_layers, activation, self.conv_channels)
        # q(z|x):  x (784 pixels) -> h (hidden_dim, 400) -> μ, log σ² (latent_dim, 20)   [AEVB App. C.2]
        self.encoder = encoder_body(*body, label_dim=0)
        self.enc_mu = nn.Linear(hidden_dim, latent_dim)                 # mean of q(z|x)
        self.enc_logvar = nn.Linear(hidden_dim, latent_dim)             # log σ² of q(z|x)
        # p(x|z):  z (latent_dim, 20) -> h (hidden_dim, 400) -> x_logits (784)
        self.decoder = decoder_body(*body, in_dim=latent_dim)
        channels_last(self)

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
    def __init__(self, arch="mlp", latent_dim=20, hidden_dim=0, hidden_layers=1, activation="relu",
                 conv_channels=DEFAULT_CONV_CHANNELS, n_classes=N_CLASSES):
        super().__init__()
        hidden_dim = keep_arguments(self, arch, latent_dim, hidden_dim, hidden_layers, activation, conv_channels)
        self.n_classes = n_classes
        body = (arch, hidden_dim, hidden_layers, activation, self.conv_channels)
        # q(z|x, y):  x (784) and y (10) -> h (hidden_dim) -> μ, log σ² (latent_dim, 2 in main.py)
        self.encoder = encoder_body(*body, label_dim=n_classes)
        self.enc_mu = nn.Linear(hidden_dim, latent_dim)                 # mean of q(z|x, y)
        self.enc_logvar = nn.Linear(hidden_dim, latent_dim)             # log σ² of q(z|x, y)
        # p(x|y, z):  z (latent_dim) and y (10) -> h (hidden_dim) -> x_logits (784)
        self.decoder = decoder_body(*body, in_dim=latent_dim + n_classes)
        channels_last(self)

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


# ---------------------------------------------------------------------------------------------
# The bodies: the networks between the input and the Gaussian heads, and between z and the logits.
# label_dim is the size of the one-hot label joined to the encoder's input: 0 for the VAE, 10 for
# the CVAE (10 extra inputs to the MLP, 10 extra input planes to the conv net).
# ---------------------------------------------------------------------------------------------
def encoder_body(arch, hidden_dim, hidden_layers, activation, channels, label_dim):
    """x (n, 1 + label_dim, 28, 28), or (n, 784 + label_dim) flat -> h (n, hidden_dim).
    mlp: dense layers. conv: the conv stack (28 -> 14 -> 7 -> ... 7), then dense layers."""
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), *dense(X_DIM + label_dim, hidden_dim, hidden_layers, activation))
    return nn.Sequential(
        *conv_layers((1 + label_dim, *channels), activation),                 # (n, c_L, 7, 7)
        nn.Flatten(), *dense(channels[-1] * 7 * 7, hidden_dim, hidden_layers, activation),
    )


def decoder_body(arch, hidden_dim, hidden_layers, activation, channels, in_dim):
    """z (n, in_dim) -> x_logits (n, 1, 28, 28). mlp: dense layers, then 784 logits. conv: the
    encoder mirrored with transposed convolutions. The decoder runs K times per image in the
    K = 5000 likelihood estimate: the conv one with channels (32, 64, 128) and 500 units costs
    about 13 million multiply-adds per z."""
    if arch == "mlp":
        return nn.Sequential(*dense(in_dim, hidden_dim, hidden_layers, activation),
                             nn.Linear(hidden_dim, X_DIM), nn.Unflatten(1, IMAGE_SHAPE))
    return nn.Sequential(
        *dense(in_dim, hidden_dim, hidden_layers, activation),
        nn.Linear(hidden_dim, channels[-1] * 7 * 7), ACTIVATIONS[activation](),
        nn.Unflatten(1, (channels[-1], 7, 7)),                                # (n, c_L, 7, 7)
        *conv_layers((1, *channels), activation, transposed=True),            # (n, 1, 28, 28) logits
    )


def dense(in_dim, hidden_dim, hidden_layers, activation):
    """hidden_layers x (Linear -> activation), the first from in_dim, the rest hidden_dim wide."""
    layers = []
    for d_in in [in_dim] + [hidden_dim] * (hidden_layers - 1):
        layers += [nn.Linear(d_in, hidden_dim), ACTIVATIONS[activation]()]
    return layers


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


def keep_arguments(net, arch, latent_dim, hidden_dim, hidden_layers, activation, conv_channels):
    """Check the constructor's arguments and keep them on net (model_args stores them); returns
    hidden_dim, the arch's default (mlp 400, conv 500) where it is 0."""
    if arch not in DEFAULT_HIDDEN_DIM:
        raise ValueError(f"unknown architecture {arch!r}: use one of {sorted(DEFAULT_HIDDEN_DIM)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
    if arch == "conv" and (not conv_channels or len(conv_channels) < 2 or min(conv_channels) < 1):
        raise ValueError(f"conv_channels {conv_channels!r}: give two or more positive channel counts, e.g. (32, 64, 128)")
    net.arch, net.latent_dim, net.hidden_dim = arch, latent_dim, hidden_dim or DEFAULT_HIDDEN_DIM[arch]
    net.hidden_layers, net.activation = hidden_layers, activation
    net.conv_channels = tuple(conv_channels) if arch == "conv" else None
    return net.hidden_dim


def channels_last(net):
    """Conv weights stored channels-last (NHWC): oneDNN then runs every convolution in that layout,
    faster on the CPUs measured (docs/speed.md); the same function up to float rounding
    (tests/test_models.py compares it with the NCHW layout). The MLP is left as it is."""
    if net.arch == "conv":
        net.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# Building a model by name, and the arguments that rebuild it
# ---------------------------------------------------------------------------------------------
MODELS = {"vae": VAE, "cvae": CVAE}


def build_model(model, arch, latent_dim, hidden_dim=0, hidden_layers=1, activation="relu",
                conv_channels=DEFAULT_CONV_CHANNELS):
    """The model named `model` ('vae' or 'cvae'): MODELS[model] with these arguments."""
    return MODELS[model](arch=arch, latent_dim=latent_dim, hidden_dim=hidden_dim, hidden_layers=hidden_layers,
                         activation=activation, conv_channels=conv_channels)


def model_args(net):
    """The arguments that rebuild `net` with build_model, stored in every checkpoint."""
    kind = "cvae" if isinstance(net, CVAE) else "vae"
    return {"model": kind, "arch": net.arch, "latent_dim": net.latent_dim, "hidden_dim": net.hidden_dim,
            "hidden_layers": net.hidden_layers, "activation": net.activation,
            "conv_channels": list(net.conv_channels) if net.conv_channels else None}
