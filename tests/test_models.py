"""The four models: shapes, conditioning that conditions, and checkpoints that round-trip."""
import pytest
import torch

import data
import models
import runs
from conftest import ROOT

PAIRS = [(kind, arch) for kind in ("vae", "cvae") for arch in ("mlp", "conv")]


@pytest.mark.parametrize("kind,arch", PAIRS)
def test_shapes(kind, arch):
    torch.manual_seed(0)
    net = models.build_model(kind, arch, latent_dim=6, hidden_dim=0)
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    args = (x, y) if kind == "cvae" else (x,)
    mu, logvar = net.encode(*args)
    assert mu.shape == logvar.shape == (5, 6)
    z_args = (mu, y) if kind == "cvae" else (mu,)
    assert net.decode(*z_args).shape == (5, 1, 28, 28)
    x_logits, mu2, logvar2 = net(*args)
    assert x_logits.shape == (5, 1, 28, 28) and torch.equal(mu, mu2) and torch.equal(logvar, logvar2)
    samples = net.sample(5, y if kind == "cvae" else None)
    assert samples.shape == (5, 1, 28, 28)
    assert samples.min() >= 0 and samples.max() <= 1


def test_default_sizes_are_the_papers():
    mlp = models.build_model("vae", "mlp", latent_dim=20, hidden_dim=0)
    assert mlp.encoder[1].weight.shape == (400, 784) and mlp.enc_mu.weight.shape == (20, 400)
    conv = models.build_model("vae", "conv", latent_dim=20, hidden_dim=0, conv_channels=(32, 64, 128))
    assert conv.enc_mu.weight.shape == (20, 500)                   # the 32-64-128 conv VAE's dense layer
    cvae = models.build_model("cvae", "mlp", latent_dim=20, hidden_dim=0)
    assert cvae.encoder[1].weight.shape == (400, 784 + 10)     # the label joins the encoder input
    assert cvae.decoder[0].weight.shape == (400, 20 + 10)      # and z


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_conv_weights_are_channels_last_and_compute_the_same_function(kind):
    """build_model stores the conv weights channels-last for speed; a copy in the default
    (NCHW) layout gives the same logits and gradients up to float32 rounding."""
    torch.manual_seed(0)
    net = models.build_model(kind, "conv", latent_dim=4, hidden_dim=0)
    conv_weights = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    nchw = models.build_model(kind, "conv", latent_dim=4, hidden_dim=0).to(memory_format=torch.contiguous_format)
    nchw.load_state_dict(net.state_dict())
    assert not nchw.encoder[2].weight.is_contiguous(memory_format=torch.channels_last)   # (64, 32, 4, 4)
    x, y, z = torch.rand(6, 1, 28, 28), torch.arange(6), torch.randn(6, 4)
    outputs = []
    for model in (net, nchw):
        model.zero_grad()
        mu, logvar = model.encode(x, y)
        x_logits = model.decode(z, y)
        (x_logits.sum() + mu.sum() + logvar.sum()).backward()
        outputs.append([mu, logvar, x_logits] + [p.grad for p in model.parameters()])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_cvae_decodes_differ_by_label_for_the_same_z(arch):
    torch.manual_seed(0)
    net = models.build_model("cvae", arch, latent_dim=4, hidden_dim=0)
    z = torch.randn(1, 4).expand(10, 4)
    images = torch.sigmoid(net.decode(z, torch.arange(10)))
    diffs = (images[:, None] - images[None, :]).abs().flatten(2).sum(-1)    # (10, 10)
    off_diagonal = diffs[~torch.eye(10, dtype=torch.bool)]
    assert (off_diagonal > 1e-3).all()
    # and the label reaches the encoder too: q(z|x, y) changes with y for the same x
    x = torch.rand(1, 1, 28, 28).expand(10, 1, 28, 28)
    mu, _ = net.encode(x, torch.arange(10))
    assert (mu[1:] - mu[0]).abs().sum(1).min() > 1e-4


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_vae_takes_a_label_and_ignores_it(arch):
    """The VAE has no label: encode/decode/forward accept y so that code can drive both models
    alike, and give the same numbers with or without it (forward's z sample is seeded)."""
    net = models.build_model("vae", arch, latent_dim=4, hidden_dim=0)
    x, z = torch.rand(3, 1, 28, 28), torch.randn(3, 4)
    for y in (torch.tensor([0, 1, 2]), torch.tensor([7, 7, 7])):
        assert all(torch.equal(a, b) for a, b in zip(net.encode(x, y), net.encode(x)))
        assert torch.equal(net.decode(z, y), net.decode(z))
        with data.seeded(x.device, 0):
            with_y = net(x, y)
        with data.seeded(x.device, 0):
            without = net(x)
        assert all(torch.equal(a, b) for a, b in zip(with_y, without))


def test_cvae_sample_refuses_missing_or_mismatched_labels():
    net = models.build_model("cvae", "mlp", latent_dim=2, hidden_dim=0)
    with pytest.raises(ValueError, match="needs the labels"):
        net.sample(3)
    with pytest.raises(ValueError, match="one label per image"):
        net.sample(3, torch.tensor([1, 2]))


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        models.VAE(arch="resnet")


@pytest.mark.parametrize("kind,arch", PAIRS)
def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path, kind, arch):
    import dataclasses
    import main
    torch.manual_seed(0)
    net = models.build_model(kind, arch, latent_dim=3, hidden_dim=32, hidden_layers=2, activation="tanh")
    optimizer = torch.optim.Adam(net.parameters())
    path = tmp_path / "checkpoint.pt"
    runs.save_checkpoint(path, net, dataclasses.asdict(dataclasses.replace(main.Config(), model=kind, arch=arch)), 1, [],
                         optimizer=optimizer, generator=torch.Generator())
    loaded = runs.read_checkpoint(path, "cpu")[0]
    assert type(loaded) is type(net) and not loaded.training
    x, y, z = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 7, 9]), torch.randn(4, 3)
    extra = (y,) if kind == "cvae" else ()
    net.eval()
    assert torch.equal(net.encode(x, *extra)[0], loaded.encode(x, *extra)[0])
    assert torch.equal(net.decode(z, *extra), loaded.decode(z, *extra))
    torch.manual_seed(5)
    a = net.sample(4, *extra)
    torch.manual_seed(5)
    assert torch.equal(a, loaded.sample(4, *extra))


def test_iwae_mnist_architecture_can_be_expressed():
    # Burda et al. 2015's one-stochastic-layer MNIST model: 784-200-200-50 (and back), tanh
    net = models.build_model("vae", "mlp", latent_dim=50, hidden_dim=200, hidden_layers=2, activation="tanh")
    linear = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [(784, 200), (200, 200), (200, 50), (200, 50), (50, 200), (200, 200), (200, 784)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in net.modules()) == 4
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_bf16_training_step_gives_nearly_the_float32_elbo_and_gradient(kind):
    # --precision bf16 runs the networks in bfloat16 (8-bit mantissa) under autocast; the ELBO's
    # terms stay float32. Same z noise (seed), so the two differ only by rounding.
    import main
    torch.manual_seed(0)
    net = models.build_model(kind, "mlp", latent_dim=20, hidden_dim=0)
    x, y = torch.rand(64, 1, 28, 28).round(), torch.arange(64) % 10
    results = []
    for bf16 in (False, True):
        net.zero_grad()
        with data.seeded(torch.device("cpu"), 1):
            elbo, log_px, kl = main.elbo_terms(net, x, y, bf16=bf16)
        (-elbo.mean()).backward()
        grad = torch.cat([p.grad.flatten() for p in net.parameters()])
        results.append((elbo.detach(), grad))
        assert elbo.dtype == log_px.dtype == kl.dtype == torch.float32
    (elbo32, grad32), (elbo16, grad16) = results
    assert not torch.equal(elbo32, elbo16)                          # bf16 really ran
    assert torch.allclose(elbo16, elbo32, rtol=0.01)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


def test_the_default_conv_model_is_the_published_32_64_128_conv_vae():
    """The conv VAE of configs/b-conv-vae.args, as its README describes it: convs 1-32-64-128 with
    two stride-2 layers (28 -> 7) and one that keeps 7x7, a 500-unit dense layer, 20-d z; the
    decoder mirrors it back to 28x28."""
    import main
    net = models.build_model("vae", "conv", latent_dim=20, hidden_dim=0, conv_channels=main.conv_channels(main.Config()))
    convs = [m for m in net.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(1, 32, 2), (32, 64, 2), (64, 128, 1)]
    deconvs = [m for m in net.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in deconvs] == [(128, 64, 1), (64, 32, 2), (32, 1, 2)]
    h = torch.rand(2, 1, 28, 28)
    for layer in net.encoder[:6]:
        h = layer(h)
    assert h.shape == (2, 128, 7, 7)
    dense = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(128 * 49, 500), (500, 20), (500, 20), (20, 500), (500, 128 * 49)]
    assert net.decode(torch.randn(2, 20)).shape == (2, 1, 28, 28)


def test_conv_checkpoints_from_before_the_channels_flag_still_load():
    """The conv VAE as first shipped (format 1) stores no conv_channels: it is the 32-64 model, and
    --eval/--resume read that back into the run's configuration."""
    import main
    old = ROOT / "tests" / "fixtures" / "vae-conv-binarized-format1.pt"
    ckpt = torch.load(old, weights_only=True)
    assert "conv_channels" not in ckpt["model_args"] and "conv_channels" not in ckpt["config"]
    net, _ = runs.read_checkpoint(old, torch.device("cpu"))
    assert net.conv_channels == (32, 64) and models.model_args(net)["conv_channels"] == [32, 64]
    cfg = main.saved_config(main.Config(), set(), ckpt, main.EVALUABLE, "checkpoint")
    assert cfg.conv_channels == "32,64"


@pytest.mark.parametrize("channels", [(), (32,), (32, 0)])
def test_too_few_or_empty_conv_channels_are_refused(channels):
    with pytest.raises(ValueError, match="two or more positive channel counts"):
        models.build_model("vae", "conv", latent_dim=2, hidden_dim=8, conv_channels=channels)


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_the_class_and_build_model_build_the_same_model(kind):
    """One constructor path: models.VAE(arch="conv") is what main.py trains (500 dense units,
    channels-last), from the same random draws."""
    torch.manual_seed(0)
    direct = models.MODELS[kind](arch="conv", latent_dim=20)
    torch.manual_seed(0)
    built = models.build_model(kind, "conv", latent_dim=20, hidden_dim=0)
    assert direct.hidden_dim == built.hidden_dim == 500 and models.model_args(direct) == models.model_args(built)
    for (name, a), (_, b) in zip(direct.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b) and a.stride() == b.stride(), name
