"""How the proposal for log p(x_o) moves the imputation score (docs/imputation.md). The full
test-set figures come from the command itself:

    python main.py --impute checkpoints/vae-mlp-binarized.pt --iw-samples 1000

This script scores the first --n binarized test digits under several proposals (M chains of some
steps, with or without fitting each component to p(z|x_o)) and K, log p(x) from K = 5000 in every
row, and prints −log p(x_h|x_o) for 1, 2, 3 given quadrants with the seconds each row took:

    python benchmarks/imputation_proposals.py --n 100
    python benchmarks/imputation_proposals.py --n 100 --json records/imputation-proposals/run.json

--json also writes every row and this run's provenance (records/imputation-proposals/ holds the
published one).

Every log p(x_o) estimate is a stochastic lower bound, so a proposal that gives a larger
−log p(x_h|x_o) (a larger log p(x_o)) is the tighter one.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data         # noqa: E402
import imputation   # noqa: E402
import losses       # noqa: E402
import runs         # noqa: E402

# (M chains, chain steps, fitting steps, K): the command's proposal without and with the fit, then more of each
ROWS = [(20, 50, 0, 1000), (20, 50, 50, 1000), (20, 50, 200, 1000), (50, 50, 50, 1000), (20, 50, 50, 5000)]


@torch.no_grad()
def score(net, x, log_px, n_chains, steps, fit_steps, k, seed):
    """Mean −log p(x_h|x_o) for 1, 2, 3 given quadrants under one proposal."""
    means = []
    with data.seeded(x.device, seed):
        for q in (1, 2, 3):
            hidden = imputation.hidden_mask(q)
            log_pxo = imputation.log_px_observed(x, hidden, net.encode, net.decode, k, n_chains, steps, fit_steps)
            means.append((log_pxo - log_px).mean().item())
    return means


def benchmark(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/vae-mlp-binarized.pt")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--n", type=int, default=100, help="the first n binarized test digits")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the rows and this run's provenance here")
    args = parser.parse_args(argv)
    runs.json_target(args.json)
    torch.set_num_threads(1)
    net, _ = runs.read_checkpoint(args.checkpoint, torch.device("cpu"))
    _, (x_test, _) = data.load_mnist(data.data_path(args.data_dir), torch.device("cpu"))
    x = data.binarize_once(x_test, "test")[:args.n]
    with torch.no_grad(), data.seeded(x.device, args.seed):
        log_px = losses.iw_log_px(x, net.encode, net.decode, 5000)
    print(f"{args.checkpoint}, first {len(x)} binarized test digits: −log p(x) {-log_px.mean():.2f} (K = 5000); "
          f"{runs.device_name(torch.device('cpu'))}, one thread")
    print("| proposal for log p(x_o) | K | 1 quadrant | 2 | 3 | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    report = {"checkpoint": args.checkpoint, "n_images": len(x), "seed": args.seed,
              "neg_log_px_k5000": -log_px.mean().item(), "rows": []}
    for n_chains, steps, fit_steps, k in ROWS:
        start = time.perf_counter()
        means = score(net, x, log_px, n_chains, steps, fit_steps, k, args.seed)
        fit = f", each fitted by {fit_steps} Adam steps" if fit_steps else ", not fitted"
        seconds = time.perf_counter() - start
        print(f"| M = {n_chains} chains of {steps} steps{fit} | {k} | " + " | ".join(f"{m:.2f}" for m in means)
              + f" | {seconds:.0f} |", flush=True)
        report["rows"].append({"chains": n_chains, "chain_steps": steps, "fit_steps": fit_steps, "k": k,
                               "neg_log_pxh_given_xo": means, "seconds": seconds})
    if args.json:
        runs.save_json({**report, "provenance": runs.provenance("cpu")}, args.json)


if __name__ == "__main__":
    benchmark()
