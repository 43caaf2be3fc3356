"""Why a CVAE's samples are not the digit asked for: for each checkpoint, the judge's accuracy on
many more samples than a run's report draws (with its binomial standard error), on samples whose z
is drawn closer to the prior's centre (z ~ N(0, τ² I)), on reconstructions of validation images
(z ~ q(z|x, y): the decoder given the z the encoder gives), and how often one prior z is judged the
same digit whatever label it is decoded with (the z, not the label, chose the digit). No test image
is read. RESULTS.md, "The CVAE's samples, and the 98% a shipped model should reach", reports its output.

    python benchmarks/cvae_samples.py checkpoints/cvae-mlp-binarized.pt RUN/best.pt ... [--json OUT]

--json writes the numbers with the run's provenance (records/cvae-samples/ holds the published one).
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data      # noqa: E402
import judge     # noqa: E402
import runs      # noqa: E402


@torch.no_grad()
def judged(classifier, images, y):
    return (classifier(images).argmax(1) == y).double()


@torch.no_grad()
def study(net, classifier, x_val, y_val, n_per_class, seed):
    classes = torch.arange(net.n_classes)
    y = classes.repeat_interleave(n_per_class)
    out = {}
    for tau in (1.0, 0.8, 0.6):
        torch.manual_seed(seed)
        z = tau * torch.randn(len(y), net.latent_dim)
        hits = judged(classifier, torch.sigmoid(net.decode(z, y)), y)
        out[f"prior, tau {tau}"] = (hits.mean().item(), hits.view(net.n_classes, -1).mean(1).tolist())
    torch.manual_seed(seed)
    mu, logvar = net.encode(x_val, y_val)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    hits = judged(classifier, torch.sigmoid(net.decode(z, y_val)), y_val)
    out["reconstruction, z ~ q(z|x,y)"] = (hits.mean().item(), [hits[y_val == d].mean().item() for d in classes])
    torch.manual_seed(seed)
    z = torch.randn(1000, net.latent_dim)
    labels = torch.stack([classifier(torch.sigmoid(net.decode(z, torch.full((len(z),), d)))).argmax(1)
                          for d in classes], 1)                         # (z, asked label) -> judged digit
    same = (labels == labels[:, :1]).all(1).double().mean().item()
    return out, same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--n-per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers and this run's provenance here")
    opts = parser.parse_args(argv)
    runs.json_target(opts.json)
    torch.set_grad_enabled(False)
    classifier, accuracy = judge.load_classifier("data", "cpu", 1)
    _, (x_val, y_val), _ = data.load_sets("data", 10000, "dynamic", "cpu")
    print(f"judge: {100 * accuracy:.2f}% on the MNIST test set; {opts.n_per_class} samples per digit; "
          f"validation images: the last 10,000 training images, binarized once")
    report = {"n_per_class": opts.n_per_class, "seed": opts.seed, "checkpoints": {}}
    for path in opts.checkpoints:
        net, ckpt = runs.read_checkpoint(path, "cpu")
        net.eval()
        out, same = study(net, classifier, x_val.view(len(x_val), -1), y_val, opts.n_per_class, opts.seed)
        print(f"\n{path} (epoch {ckpt['epoch']})")
        errors = {}
        for name, (acc, per) in out.items():
            n = len(y_val) if name.startswith("reconstruction") else net.n_classes * opts.n_per_class
            se = errors[name] = math.sqrt(acc * (1 - acc) / n)          # binomial standard error
            print(f"  {name:<30} {100 * acc:5.2f}% ± {100 * se:.2f}   per digit "
                  + " ".join(f"{100 * a:.0f}" for a in per))
        print(f"  a prior z judged the same digit under all 10 labels: {100 * same:.1f}% of 1000")
        report["checkpoints"][str(path)] = {"epoch": ckpt["epoch"], "same_digit_under_all_labels": same, **{
            name: {"accuracy": acc, "standard_error": errors[name], "per_digit": per}
            for name, (acc, per) in out.items()}}
    if opts.json:
        runs.save_json({**report, "provenance": runs.provenance("cpu")}, opts.json)


if __name__ == "__main__":
    main()
