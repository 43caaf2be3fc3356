"""Bits-back coding (bbans.py): the bucket maths against torch.distributions, round trips bit for
bit on a tiny random VAE, code lengths against the distributions' own log-probabilities, and the
command line with its refusals of bad input. CPU only, a few seconds."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conftest import main_in_process, refused

import bbans
import losses
import main
import models
import runs

N_IMAGES = 6


def tiny_vae(seed=0, latent_dim=4, arch="mlp"):
    """An untrained VAE, 16 dense units; conv: 4 and 8 channels (the coder sees only encode and decode)."""
    torch.manual_seed(seed)
    return models.build_model("vae", arch, latent_dim, 16, conv_channels=(4, 8)).eval()


def random_images(n=N_IMAGES, seed=0):
    return (np.random.default_rng(seed).random((n, 784)) < 0.3).astype(np.uint8)


def save(net, path, binarize="dynamic"):
    cfg = main.Config(binarize=binarize, latent_dim=net.latent_dim, hidden_dim=net.hidden_dim,
                      model=models.model_args(net)["model"])
    runs.save_checkpoint(path, net, dataclasses.asdict(cfg), 1, [])
    return path


# ---------------------------------------------------------------------------------------------
# The discretisation: buckets of equal prior mass, and the posterior's mass on each
# ---------------------------------------------------------------------------------------------
def test_buckets_have_equal_prior_mass_and_centres_are_medians():
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    edges, centres = bbans.bucket_edges(4), bbans.bucket_centres(4)
    assert edges[0] == -math.inf and edges[-1] == math.inf and len(centres) == 16
    assert torch.allclose(normal.cdf(edges[1:-1]).diff(), torch.full((14,), 1 / 16, dtype=torch.float64))
    assert torch.allclose(normal.cdf(centres), (torch.arange(16) + 0.5).double() / 16)
    assert ((edges[:-1] < centres) & (centres < edges[1:])).all()


def test_posterior_buckets_match_torch_distributions_and_a_monte_carlo_count():
    mu, std = torch.tensor([0.3, -1.2, 0.0]).double(), torch.tensor([0.2, 0.7, 1.0]).double()
    edges = bbans.bucket_edges(3)
    Q = bbans.posterior_buckets(mu, std, edges)
    normal = torch.distributions.Normal(mu[:, None], std[:, None])
    assert torch.allclose(Q.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(Q[:, 1:-1], normal.cdf(edges[2:-1]) - normal.cdf(edges[1:-2]))
    assert torch.allclose(Q[2], torch.full((8,), 1 / 8, dtype=torch.float64))     # q = p: 1/B each
    torch.manual_seed(0)
    z = mu + std * torch.randn(200_000, 3, dtype=torch.float64)
    buckets = torch.bucketize(z.T.contiguous(), edges[1:-1])                          # (3, 200000)
    counts = torch.stack([torch.bincount(b, minlength=8) for b in buckets]).double()
    assert torch.allclose(counts / 200_000, Q, atol=0.005)


# ---------------------------------------------------------------------------------------------
# The coder: bit-for-bit round trips, and code lengths that are the model's log-probabilities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_round_trip_is_bit_for_bit_and_returns_the_clean_bits(arch):
    net, x_bits = tiny_vae(arch=arch), random_images()
    words, _ = bbans.encode(net, x_bits)
    assert np.array_equal(bbans.decode(net, words, len(x_bits)), x_bits)   # decode checks the clean bits


@pytest.mark.parametrize("latent_bits", [2, 8, 12])
def test_round_trip_at_any_bucket_precision(latent_bits):
    net, x_bits = tiny_vae(seed=1), random_images(seed=1)
    words, _ = bbans.encode(net, x_bits, latent_bits)
    assert np.array_equal(bbans.decode(net, words, len(x_bits), latent_bits), x_bits)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_code_length_is_the_discretised_negative_elbo_of_the_z_used(arch):
    """Net bits = Σ_i −log2 p(x_i|z_i) − log2 P(z_i) + log2 Q(z_i|x_i), recomputed with
    torch.distributions from the float32 model for the z each image was coded with; equal up to the
    coder's 24-bit rounding. And near the −ELBO, its expectation up to the discretisation and to the
    popped bits being not quite random (measured: within 0.2%, mlp and conv)."""
    net, x_bits = tiny_vae(seed=2, arch=arch), random_images(n=40, seed=2)
    with torch.no_grad():
        net.enc_logvar.bias -= 2             # σ ≈ e^-1, narrower than the prior, as a trained model's
    words, lengths = bbans.encode(net, x_bits)
    x, z = torch.from_numpy(x_bits).float().view(-1, 1, 28, 28), torch.from_numpy(lengths["z_buckets"]).long()
    edges = bbans.bucket_edges(bbans.LATENT_BITS)
    with torch.no_grad():
        x_logits = net.decode(bbans.bucket_centres(bbans.LATENT_BITS)[z].float())          # p(x|z), z at the medians
        mu, logvar = (t.double() for t in net.encode(x))
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))                        # q(z|x)
        expected = {"pixels": -torch.distributions.Bernoulli(logits=x_logits).log_prob(x).sum().item() / math.log(2),
                    "bits_back": -(q.cdf(edges[z + 1]) - q.cdf(edges[z])).log2().sum().item()}     # −log2 Q(z|x)
    # the coder's lengths are read off its state, so each is within about a bit per image
    assert lengths["pixels"] == pytest.approx(expected["pixels"], rel=1e-3, abs=len(x_bits))
    assert lengths["bits_back"] == pytest.approx(expected["bits_back"], rel=1e-3, abs=len(x_bits))
    net_bits = 32 * (len(words) - len(bbans.clean_words(net.latent_dim)))
    assert net_bits == pytest.approx(expected["pixels"] + lengths["prior"] - expected["bits_back"], abs=64)
    torch.manual_seed(0)
    with torch.no_grad():                      # −ELBO [AEVB Eq. 10], 100 draws of z per image, in bits
        neg_elbo = -torch.stack([losses.elbo(x, *net(x))[0] for _ in range(100)]).mean(0).sum().item() / math.log(2)
    assert net_bits == pytest.approx(neg_elbo, rel=0.01)


def test_encoder_is_deterministic():
    net, x_bits = tiny_vae(), random_images()
    assert np.array_equal(bbans.encode(net, x_bits)[0], bbans.encode(net, x_bits)[0])


# ---------------------------------------------------------------------------------------------
# The file, the command line, and bad input: one line, exit code 2
# ---------------------------------------------------------------------------------------------
def test_compress_then_decompress_through_the_command_line(tiny_mnist, tmp_path, capsys):
    ckpt = save(tiny_vae(), tmp_path / "vae.pt")
    code, out, err = main_in_process(capsys, "--compress", ckpt, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 0, err
    run_dir = next((tmp_path / "out").glob("bbans-vae-mlp-*"))
    report = json.loads((run_dir / "metrics.json").read_text())
    n = len(bbans.binarized_test_set(tiny_mnist))
    assert report["n_images"] == n and report["bit_for_bit"]
    assert report["bits_per_dim"] == pytest.approx(8 * (run_dir / "test.bbans").stat().st_size / (n * 784))
    assert set(report["baselines_bits_per_dim"]) == {"raw_packbits", "gzip", "bz2", "lzma", "png_per_image", "png_grid"}
    assert report["baselines_bits_per_dim"]["raw_packbits"] == 1.0
    assert "BB-ANS" in out and "bits/dim" in out
    # decompression reads only the file and the checkpoint (no --data-dir; run from another folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        code, _, err = main_in_process(capsys, "--decompress", run_dir / "test.bbans", "--checkpoint", ckpt,
                                       "--out-dir", tmp_path / "out2")
    assert code == 0, err
    decoded = np.load(next((tmp_path / "out2").glob("bbans-decompress-*")) / "decoded.npy")
    assert np.array_equal(decoded, bbans.binarized_test_set(tiny_mnist).view(-1, 28, 28).numpy().astype(np.uint8))


@pytest.fixture
def compressed(tmp_path):
    """A small file written by bbans.write_file with the tiny VAE, and that VAE's checkpoint."""
    net, x_bits = tiny_vae(), random_images()
    words, _ = bbans.encode(net, x_bits)
    bbans.write_file(tmp_path / "x.bbans", words, len(x_bits), net, x_bits)
    return tmp_path / "x.bbans", save(net, tmp_path / "vae.pt"), x_bits


def test_decompress_file_returns_the_images(compressed):
    path, ckpt, x_bits = compressed
    assert np.array_equal(bbans.decompress_file(path, runs.read_checkpoint(ckpt, "cpu")[0]), x_bits)


def test_refuses_a_cvae_and_a_grey_checkpoint(tiny_mnist, tmp_path, capsys):
    torch.manual_seed(0)
    cvae = save(models.build_model("cvae", "mlp", 2, 16), tmp_path / "cvae.pt")
    assert "holds a CVAE" in refused(capsys, "--compress", cvae, "--data-dir", tiny_mnist, "--out-dir", tmp_path)
    grey = save(tiny_vae(), tmp_path / "grey.pt", binarize="none")
    assert "grey pixels" in refused(capsys, "--compress", grey, "--data-dir", tiny_mnist, "--out-dir", tmp_path)
    assert not list(tmp_path.glob("bbans-*"))


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "CRC-32"),
    (lambda b: b"NOTBBANS" + b[8:], "not a file written by --compress"),
    (lambda b: b"", "not a file written by --compress"),
])
def test_refuses_a_damaged_file(compressed, tmp_path, capsys, damage, message):
    path, ckpt, _ = compressed
    path.write_bytes(damage(path.read_bytes()))
    assert message in refused(capsys, "--decompress", path, "--checkpoint", ckpt, "--out-dir", tmp_path / "out")


def test_refuses_another_checkpoint_and_missing_flags(compressed, tmp_path, capsys):
    path, ckpt, _ = compressed
    other = save(tiny_vae(seed=5), tmp_path / "other.pt")
    assert "another model" in refused(capsys, "--decompress", path, "--checkpoint", other, "--out-dir", tmp_path)
    assert "needs --checkpoint" in refused(capsys, "--decompress", path, "--out-dir", tmp_path)
    assert "needs --checkpoint" in refused(capsys, "--compress", ckpt, "--checkpoint", ckpt)
    assert "needs --checkpoint" in refused(capsys, "--checkpoint", ckpt)
    assert "--compress and --decompress exclude each other" in refused(capsys, "--decompress", path, "--compress", ckpt)
    assert "--eval and --compress exclude each other" in refused(capsys, "--compress", ckpt, "--eval", ckpt)
    assert "no compressed file" in refused(capsys, "--decompress", tmp_path / "missing.bbans", "--checkpoint", ckpt)


def test_a_wrong_model_with_the_right_hash_is_caught_by_the_images_hash(compressed, monkeypatch):
    """If the arithmetic differed between the two sides, decoding gives other images (or fails);
    the images' hash in the header turns that into an error, never a silent wrong answer."""
    path, ckpt, _ = compressed
    net = runs.read_checkpoint(ckpt, "cpu")[0]
    monkeypatch.setattr(bbans, "model_hash", lambda _: bbans.read_file(path)[0]["model_hash"])
    with torch.no_grad():
        net.decoder[-2].bias += 0.5             # the last Linear: other pixel probabilities
    with pytest.raises(bbans.CompressionError):
        bbans.decompress_file(path, net)
