"""Lossless compression of binarized MNIST by bits-back coding with a trained VAE [BB-ANS].

    python main.py --compress checkpoints/vae-mlp-binarized.pt      # -> results/bbans-.../test.bbans
    python main.py --decompress results/bbans-.../test.bbans --checkpoint checkpoints/vae-mlp-binarized.pt

BB-ANS = Townsend, Bird & Barber 2019, "Practical Lossless Compression with Latent Variables using
Bits Back Coding", ICLR 2019, arXiv:1901.04866. Tags name the paper's idea ([BB-ANS: bits back],
[BB-ANS: discretisation], [BB-ANS: clean bits]), not a section number, which was not checked.

A VAE gives no code for x directly: p(x) = ∫ p(x|z) p(z) dz is an integral. Bits back codes x
in three steps on a stack of bits (an ANS coder, last in first out):
  1. pop   z ~ q(z|x) from the bits already on the stack      -log q(z|x) bits taken   ("got back")
  2. push  x with p(x|z)                                        -log p(x|z) bits added
  3. push  z with p(z)                                          -log p(z)   bits added
Net: -log p(x|z) - log p(z) + log q(z|x) bits per image, whose mean over z ~ q is the -ELBO
[BB-ANS: bits back; AEVB Eq. 10]. The decoder runs the steps backwards and in reverse
order: pop z with p(z), pop x with p(x|z), then push z with q(z|x), which returns the borrowed bits.

Discretisation [BB-ANS: discretisation]: each z_j takes one of B = 2^LATENT_BITS buckets of
equal prior mass, bucket k = [Φ⁻¹(k/B), Φ⁻¹((k+1)/B)), represented by its prior median
Φ⁻¹((k + ½)/B). Then P(z_j = k) = 1/B exactly (LATENT_BITS bits per dimension) and
Q(z_j = k | x) = Φ((e_{k+1} − μ_j)/σ_j) − Φ((e_k − μ_j)/σ_j), the mass q puts on the bucket;
the discretised ELBO approaches the continuous one when buckets are narrow against σ_j.

Determinism: the decoder must compute bit-identical probabilities. Both sides run the networks
in float64 on the CPU with one thread, one image at a time (the same batch composition and the
same z inputs, the bucket medians), and the coder quantizes every probability to 24 bits in the
same way. The file carries a hash of the images, so any mismatch is detected, never silent.
"""
import bz2
import copy
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import math
import struct
import time
import zlib
from importlib.metadata import version
from pathlib import Path

import constriction
import numpy as np
import torch
from PIL import Image

import data
import losses
import models
import runs

LATENT_BITS = 8          # B = 256 buckets per latent dimension, as in the BB-ANS authors' MNIST script
FAMILIES = constriction.stream.model   # the coder's model families (24-bit fixed-point probabilities)
CLEAN_SEED = 20190111                   # the seeded "clean" words the first image's z is popped from
MAGIC = b"VAEBBANS"
VERSION = 1
# magic, version, latent bits, clean words, images n, payload words, model hash, images hash
HEADER = struct.Struct("<8sHHHII16s16s")
CRC = struct.Struct("<I")


class CompressionError(data.DataError):
    """Bad input to --compress or --decompress; a DataError, so main() prints it on one line, exit 2."""


# ------------------------------------------------------------------------------------------------
# Discretised latents and the three distributions, as probability arrays for the coder
# ------------------------------------------------------------------------------------------------
def bucket_edges(latent_bits):
    """e_k = Φ⁻¹(k/B), k = 0..B: B buckets of prior mass 1/B each; e_0 = -inf, e_B = +inf."""
    B = 2 ** latent_bits
    return torch.special.ndtri(torch.arange(B + 1, dtype=torch.float64) / B)


def bucket_centres(latent_bits):
    """The value z takes in bucket k: its prior median Φ⁻¹((k + ½)/B), shape (B,)."""
    B = 2 ** latent_bits
    return torch.special.ndtri((torch.arange(B, dtype=torch.float64) + 0.5) / B)


def posterior_buckets(mu, std, edges):
    """Q(z_j = k | x) = Φ((e_{k+1} − μ_j)/σ_j) − Φ((e_k − μ_j)/σ_j), the mass of q(z_j|x) in bucket k:
    μ, σ (latent_dim,) -> (latent_dim, B).   [BB-ANS: discretisation]"""
    cdf = torch.special.ndtr((edges - mu[:, None]) / std[:, None])     # (latent_dim, B + 1)
    return cdf.diff(dim=1)


class Coding:
    """The VAE in float64 and the bucket tables: every probability both coder directions use."""
    def __init__(self, net, latent_bits=LATENT_BITS):
        self.net = copy.deepcopy(net).cpu().double().eval()
        self.latent_bits = latent_bits
        self.edges, self.centres = bucket_edges(latent_bits), bucket_centres(latent_bits)

    @torch.no_grad()
    def posterior(self, x):
        """Q(z|x) of one binary image x (784,) int32: (latent_dim, B) float64."""
        mu, logvar = self.net.encode(torch.from_numpy(x).double().view(1, *models.IMAGE_SHAPE))
        return posterior_buckets(mu[0], torch.exp(0.5 * logvar[0]), self.edges).numpy()

    @torch.no_grad()
    def pixel_probs(self, z_buckets):
        """p(x_d = 1 | z) = σ(logits_d(z)) at the bucket medians z: (784,) float64."""
        z = self.centres[torch.from_numpy(z_buckets).long()].view(1, -1)
        return torch.sigmoid(self.net.decode(z)).view(-1).numpy()


# ------------------------------------------------------------------------------------------------
# One image on and off the stack [BB-ANS: bits back]
# ------------------------------------------------------------------------------------------------
def push_image(coder, coding, x, lengths):
    """Append image x (784,) int32 to the stack; add its three code lengths (bits) to `lengths`."""
    bits = coder.num_valid_bits()
    z = coder.decode(FAMILIES.Categorical(perfect=False), coding.posterior(x))  # pop z ~ Q(z|x)
    lengths["bits_back"] += bits - coder.num_valid_bits()                          # + log Q(z|x)
    bits = coder.num_valid_bits()
    coder.encode_reverse(x, FAMILIES.Bernoulli(perfect=False), coding.pixel_probs(z))  # push x, p(x|z)
    lengths["pixels"] += coder.num_valid_bits() - bits                             # − log p(x|z)
    coder.encode_reverse(z, FAMILIES.Uniform(2 ** coding.latent_bits))                # push z, P(z) = 1/B
    return z


def pop_image(coder, coding, latent_dim):
    """The inverse of push_image: take the last image pushed off the stack, restoring the bits
    its z was popped from."""
    z = coder.decode(FAMILIES.Uniform(2 ** coding.latent_bits), latent_dim)            # pop z, P(z)
    x = coder.decode(FAMILIES.Bernoulli(perfect=False), coding.pixel_probs(z))         # pop x, p(x|z)
    coder.encode_reverse(z, FAMILIES.Categorical(perfect=False), coding.posterior(x))  # push z, Q(z|x)
    return x


def clean_words(latent_dim):
    """[BB-ANS: clean bits] Seeded random 32-bit words that start the stack: the first image's z is popped from them.
    Enough for the worst case, latent_dim symbols of at most 24 bits each, plus the coder's head;
    they are stored in the file and counted in its size, and decoding ends by returning them."""
    n = math.ceil(latent_dim * 24 / 32) + 2
    return np.random.default_rng(CLEAN_SEED).integers(1, 2 ** 32, n, dtype=np.uint32)


@contextlib.contextmanager
def one_thread():
    """Matrix products on one thread: the same summation order whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def encode(net, x_bits, latent_bits=LATENT_BITS):
    """x_bits (n, 784) uint8 in {0, 1} -> (the stack's 32-bit words, code lengths in bits).
    Images are pushed in order 0..n-1; z_buckets records the z each image was coded with."""
    coding = Coding(net, latent_bits)
    coder = constriction.stream.stack.AnsCoder(clean_words(net.latent_dim))
    lengths = {"bits_back": 0, "pixels": 0}
    z_buckets = []
    with one_thread():
        for x in x_bits.astype(np.int32):
            z_buckets.append(push_image(coder, coding, x, lengths))
    lengths["prior"] = len(x_bits) * net.latent_dim * latent_bits                  # − log P(z)
    return coder.get_compressed(), {**lengths, "z_buckets": np.stack(z_buckets)}


def decode(net, words, n, latent_bits=LATENT_BITS):
    """The n images back from the stack's words, bit for bit: (n, 784) uint8."""
    coding = Coding(net, latent_bits)
    coder = constriction.stream.stack.AnsCoder(words)
    with one_thread():
        images = [pop_image(coder, coding, net.latent_dim) for _ in range(n)]     # last image first
    if not np.array_equal(coder.get_compressed(), clean_words(net.latent_dim)):
        raise CompressionError("decoding did not end on the clean bits it started from: the file and the "
                               "model disagree (corrupt file, or another model's arithmetic)")
    return np.stack(images[::-1]).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# The file: header (magic, sizes, hashes of the model and of the images), payload, CRC-32
# ------------------------------------------------------------------------------------------------
def model_hash(net):
    """16 bytes that identify the model: sha256 of its arguments and of every weight's bytes."""
    digest = hashlib.sha256(json.dumps(models.model_args(net), sort_keys=True).encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()[:16]


def images_hash(x_bits):
    return hashlib.sha256(np.packbits(x_bits).tobytes()).digest()[:16]


def write_file(path, words, n, net, x_bits, latent_bits=LATENT_BITS):
    header = HEADER.pack(MAGIC, VERSION, latent_bits, len(clean_words(net.latent_dim)), n, len(words),
                         model_hash(net), images_hash(x_bits))
    body = header + words.astype("<u4").tobytes()
    runs.save_atomic(lambda p: p.write_bytes(body + CRC.pack(zlib.crc32(body))), Path(path))


def read_file(path):
    """(header fields as a dict, the payload words), or a CompressionError that says what is wrong."""
    if not Path(path).is_file():
        raise CompressionError(f"no compressed file at {path}: pass a .bbans file written by --compress")
    blob = Path(path).read_bytes()
    if blob[:8] != MAGIC:
        raise CompressionError(f"{path} is not a file written by --compress (no {MAGIC.decode()} header)")
    if len(blob) < HEADER.size + CRC.size:
        raise CompressionError(f"{path} holds only {len(blob)} bytes, less than a header: the file is truncated")
    magic, version, latent_bits, n_clean, n, n_words, net_hash, x_hash = HEADER.unpack_from(blob)
    if version != VERSION:
        raise CompressionError(f"{path} has format version {version}; this code reads version {VERSION}")
    if len(blob) != HEADER.size + 4 * n_words + CRC.size:
        raise CompressionError(f"{path} holds {len(blob)} bytes, its header promises "
                               f"{HEADER.size + 4 * n_words + CRC.size}: the file is truncated or extended")
    if CRC.unpack_from(blob, len(blob) - CRC.size)[0] != zlib.crc32(blob[:-CRC.size]):
        raise CompressionError(f"{path} fails its CRC-32 checksum: the file is corrupt")
    words = np.frombuffer(blob, dtype="<u4", count=n_words, offset=HEADER.size).astype(np.uint32)
    return {"latent_bits": latent_bits, "n": n, "model_hash": net_hash, "images_hash": x_hash}, words


def decompress_file(path, net):
    """The images stored in `path`, decoded with `net`, checked against the hash in the header."""
    header, words = read_file(path)
    if header["model_hash"] != model_hash(net):
        raise CompressionError(f"{path} was compressed with another model (its weights' hash differs): "
                               f"decompress with the checkpoint --compress used")
    x_bits = decode(net, words, header["n"], header["latent_bits"])
    if images_hash(x_bits) != header["images_hash"]:
        raise CompressionError(f"the images decoded from {path} do not match its hash: the model's "
                               f"arithmetic differed from compression's (another machine or library?)")
    return x_bits


# ------------------------------------------------------------------------------------------------
# What the rate is compared with: the model's -ELBO, and general-purpose compressors
# ------------------------------------------------------------------------------------------------
def png_bytes(image):
    """Bytes of a 1-bit PNG of a (h, w) array of {0, 1} (PIL, zlib level 9: smaller here than optimize)."""
    buffer = io.BytesIO()
    Image.fromarray(image.astype(bool)).save(buffer, format="PNG", compress_level=9)
    return buffer.tell()


def baseline_sizes(x_bits):
    """Bytes of the n images under general-purpose compressors: gzip, bz2, lzma (each at its
    strongest setting) on the packed bits (np.packbits: 98 bytes per image); PNG as one 1-bit
    file per image, and as one square grid of all images in a single 1-bit file."""
    packed = np.packbits(x_bits).tobytes()
    images = x_bits.reshape(-1, 28, 28)
    side = math.ceil(math.sqrt(len(images)))
    grid = np.zeros((side * side, 28, 28), dtype=np.uint8)
    grid[:len(images)] = images
    grid = grid.reshape(side, side, 28, 28).transpose(0, 2, 1, 3).reshape(side * 28, side * 28)
    return {"raw_packbits": len(packed), "gzip": len(gzip.compress(packed, 9)), "bz2": len(bz2.compress(packed, 9)),
            "lzma": len(lzma.compress(packed, preset=9 | lzma.PRESET_EXTREME)),
            "png_per_image": sum(png_bytes(image) for image in images), "png_grid": png_bytes(grid)}


# ------------------------------------------------------------------------------------------------
# The two commands: python main.py --compress CKPT  and  --decompress FILE --checkpoint CKPT
# (main.py reads the flags and the checkpoint and calls these)
# ------------------------------------------------------------------------------------------------
def binarized_test_set(data_dir):
    """The fixed binarized test set, (n, 1, 28, 28), on the CPU: the one every binarized model is scored on."""
    _, _, (x_test, _) = data.load_sets(data_dir, 0, "dynamic", torch.device("cpu"))
    return x_test


def compress_command(checkpoint, net, x_test, neg_elbo_nats, run_dir):
    """Compress the binarized test images x_test into run_dir/test.bbans, decompress that file again
    (timed, and compared bit for bit), and write every rate beside the model's -ELBO (neg_elbo_nats,
    nats per image) and the baselines to metrics.json."""
    x_bits = x_test.view(len(x_test), -1).numpy().astype(np.uint8)
    print(f"compressing {len(x_bits)} binarized test images with {checkpoint}: writing {run_dir}")
    load = (runs.load_average() or [None])[0]
    start = time.perf_counter()
    words, lengths = encode(net, x_bits)
    write_file(run_dir / "test.bbans", words, len(x_bits), net, x_bits)
    seconds = {"encode_seconds": time.perf_counter() - start}
    start = time.perf_counter()
    if not np.array_equal(decompress_file(run_dir / "test.bbans", net), x_bits):
        raise CompressionError("the decoded images differ from the originals")     # only by a hash collision
    seconds["decode_seconds"] = time.perf_counter() - start
    report = {"checkpoint": str(checkpoint), "n_images": len(x_bits), "bit_for_bit": True,
              **rates(run_dir / "test.bbans", x_bits, lengths, net.latent_dim), "neg_elbo_nats": neg_elbo_nats,
              **seconds, "cpu": runs.device_name(torch.device("cpu")), "load_average_1min": load, "torch_threads": 1,
              "torch": torch.__version__, "constriction": version("constriction"), "latent_bits": LATENT_BITS}
    report["neg_elbo_bits_per_dim"] = losses.bits_per_dim(report["neg_elbo_nats"])
    report["above_neg_elbo"] = report["bits_per_dim"] / report["neg_elbo_bits_per_dim"] - 1
    report["baselines_bits_per_dim"] = {name: 8 * size / x_bits.size for name, size in baseline_sizes(x_bits).items()}
    runs.save_json(report, run_dir / "metrics.json")
    print_report(report)
    return run_dir


def rates(path, x_bits, lengths, latent_dim):
    """The file's size in bits per dimension (bytes x 8 / (n x 784)), and its parts."""
    per_dim = 1 / x_bits.size
    file_bytes = Path(path).stat().st_size
    clean_bits = 32 * len(clean_words(latent_dim))
    return {"file_bytes": file_bytes, "bits_per_dim": 8 * file_bytes * per_dim, "header_bytes": HEADER.size + CRC.size,
            "clean_bits": clean_bits, "clean_bits_per_dim": clean_bits * per_dim,
            **{f"{part}_bits_per_dim": lengths[part] * per_dim for part in ("pixels", "prior", "bits_back")}}


def decompress_command(compressed, net):
    """(x_bits, seconds): the images of the file compressed with net, (n, 784) uint8 in {0, 1}, and the
    time decoding took; a CompressionError for a damaged file or another model, before anything is written."""
    start = time.perf_counter()
    x_bits = decompress_file(compressed, net)
    return x_bits, time.perf_counter() - start


def write_decompressed(compressed, checkpoint, x_bits, seconds, run_dir):
    """run_dir/decoded.npy, (n, 28, 28) uint8 in {0, 1}, and run_dir/metrics.json."""
    def save(path):
        with open(path, "wb") as f:            # a file object: np.save would add .npy to the .tmp name
            np.save(f, x_bits.reshape(-1, 28, 28))
    runs.save_atomic(save, run_dir / "decoded.npy")
    report = {"compressed": str(compressed), "checkpoint": str(checkpoint), "n_images": len(x_bits),
              "decode_seconds": seconds, "cpu": runs.device_name(torch.device("cpu")), "images_hash_matches": True}
    runs.save_json(report, run_dir / "metrics.json")
    print(f"decoded {len(x_bits)} images in {seconds:.1f} s ({report['cpu']}), matching the file's hash: {run_dir}")


def print_report(r):
    print(f"BB-ANS {r['bits_per_dim']:.4f} bits/dim ({r['file_bytes']} bytes for {r['n_images']} images); "
          f"the model's -ELBO {r['neg_elbo_bits_per_dim']:.4f} bits/dim ({r['neg_elbo_nats']:.2f} nats): "
          f"{100 * r['above_neg_elbo']:+.2f}%")
    print(f"  = pixels {r['pixels_bits_per_dim']:.4f} + prior {r['prior_bits_per_dim']:.4f} - bits back "
          f"{r['bits_back_bits_per_dim']:.4f} + clean bits {r['clean_bits_per_dim']:.6f} ({r['clean_bits']} bits) "
          f"+ header {r['header_bytes']} bytes + the coder's final head")
    print("  baselines: " + ", ".join(f"{k} {v:.4f}" for k, v in r["baselines_bits_per_dim"].items()) + " bits/dim")
    load = "unknown" if r["load_average_1min"] is None else f"{r['load_average_1min']:.1f}"
    print(f"  encode {r['encode_seconds']:.1f} s, decode {r['decode_seconds']:.1f} s, bit for bit ({r['cpu']}, "
          f"one thread, load average {load} at the start)")
