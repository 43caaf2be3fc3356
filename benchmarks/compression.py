"""How the bucket precision of bits-back coding trades rate for time (docs/compression.md).
The full 10,000-image figures come from the command itself:

    python main.py --compress checkpoints/vae-mlp-binarized.pt

This script codes the first --n binarized test images with 2^b buckets per latent dimension for
each b in --latent-bits, decodes them again (checked bit for bit), and prints the rate beside the
model's -ELBO on the same images:

    python benchmarks/compression.py --n 1000 --latent-bits 4 6 8 10 12
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bbans    # noqa: E402
import losses   # noqa: E402
import main     # noqa: E402
import runs     # noqa: E402


def measure(net, x_bits, latent_bits):
    """(bits/dim without and with the clean bits, encode seconds, decode seconds) of one precision."""
    n = len(x_bits)
    start = time.perf_counter()
    words, _ = bbans.encode(net, x_bits, latent_bits)
    encode_seconds = time.perf_counter() - start
    start = time.perf_counter()
    assert np.array_equal(bbans.decode(net, words, n, latent_bits), x_bits), "not bit for bit"
    decode_seconds = time.perf_counter() - start
    clean = len(bbans.clean_words(net.latent_dim))
    return 32 * (len(words) - clean) / (n * 784), 32 * len(words) / (n * 784), encode_seconds, decode_seconds


def benchmark(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/vae-mlp-binarized.pt")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--n", type=int, default=1000, help="the first n binarized test images")
    parser.add_argument("--latent-bits", type=int, nargs="+", default=[4, 6, 8, 10, 12])
    args = parser.parse_args(argv)
    net, ckpt = runs.read_checkpoint(args.checkpoint, "cpu")
    x_test = bbans.binarized_test_set(args.data_dir)[:args.n]
    x_bits = x_test.view(len(x_test), -1).numpy().astype(np.uint8)
    labels = torch.zeros(len(x_test), dtype=torch.long)                 # the VAE reads none
    neg_elbo = losses.bits_per_dim(main.evaluate(net, x_test, labels, ckpt["config"]["seed"])[0]["test_neg_elbo"])
    print(f"{args.checkpoint}, first {len(x_bits)} test images: -ELBO {neg_elbo:.4f} bits/dim; "
          f"{runs.device_name(torch.device('cpu'))}, one thread")
    print("| buckets per latent dim | bits/dim without clean bits | with clean bits | vs -ELBO | encode s | decode s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b in args.latent_bits:
        rate, rate_clean, encode_seconds, decode_seconds = measure(net, x_bits, b)
        print(f"| 2^{b} = {2 ** b} | {rate:.4f} | {rate_clean:.4f} | {100 * (rate / neg_elbo - 1):+.2f}% "
              f"| {encode_seconds:.1f} | {decode_seconds:.1f} |")


if __name__ == "__main__":
    benchmark()
