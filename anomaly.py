"""Anomaly detection on one-class MNIST with a VAE: Ruff et al. 2018's protocol (Table 1).

    python main.py @configs/one-class.args        # = --one-class all --model vae --epochs 20
    python anomaly.py results/anomaly-mlp-*/      # mean ± std over runs (seeds) of the command above

For each digit d: train a VAE on the training images of d only, score all 10,000 test images,
and call the other nine digits anomalies. Four scores, the higher the more anomalous:
  −ELBO         one z ~ q(z|x) per image                                          [AEVB Eq. 10]
  recon error   Σ_d (x_d − σ(l_d))², l = decoder logits at z = μ(x): no sampling, no KL
  −log p(x)     the k-sample importance-weighted estimate, k = --iw-samples     [IWAE §3]
  −log p(x) − L(x)   the IW score less the image's DEFLATE-compressed length: Serrà et al. 2020's
                input-complexity correction (complexity_nats). Both terms are code lengths of
                binary images only when the pixels are binary (--binarize dynamic); on grey pixels
                the first is a Bernoulli cross-entropy (about 100 nats) and the second the length
                of 784 bytes (about 1,000 nats), different units: computed, but not a score to read
The last two need k >= 1: --iw-samples 0 skips them (the fast way to repeat the run over seeds).
Each is summarised by the area under the ROC curve (AUROC), per digit and averaged.

Ruff et al. 2018 = "Deep One-Class Classification", ICML 2018, Table 1 (AUROC %, MNIST).
main.py trains the models (its own training loop, on one digit's training images) and calls the
functions here to score them; `python anomaly.py RUN...` summarises runs over seeds.
"""
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps

import data
import losses
import runs
from viz import figure, save_figure

# What may differ between runs of one command: the seed, where they were written, where the data
# was read from, and what runs written before the mode flags left the configuration stored beside it
NOT_SETTINGS = {"seed", "out_dir", "data_dir", "val_size", "patience", "eval", "resume", "compress", "decompress",
                "checkpoint", "one_class", "impute"}
SCORES = ("neg_elbo", "recon_error", "neg_log_px", "neg_log_px_minus_complexity")   # the last two need k >= 1
SCORE_NAMES = {"neg_elbo": "−ELBO", "neg_log_px": "−log p(x) (IW)", "recon_error": "squared error at z = μ",
               "neg_log_px_minus_complexity": "−log p(x) − L(x) (DEFLATE)"}
# Ruff et al. 2018, Table 1: AUROC (%) of One-Class Deep SVDD per digit 0..9 and the means of the others
DEEP_SVDD = [98.0, 99.7, 91.7, 91.9, 94.9, 88.5, 98.3, 94.6, 93.9, 96.5]
ANCHOR_MEANS = {"One-class Deep SVDD": 94.8, "DCAE": 89.7, "KDE": 86.9, "OC-SVM": 91.3}


# ---------------------------------------------------------------------------------------------
# AUROC: the Mann–Whitney U statistic, from ranks
# ---------------------------------------------------------------------------------------------
def average_ranks(scores):
    """Ranks 1..n of scores (n,), tied values sharing the mean of the ranks they span."""
    values, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()              # rank of the last member of each group of ties
    return (last - (counts - 1) / 2)[inverse]     # the mean of first..last = last − (count − 1)/2


def auroc(scores, is_anomaly):
    """P(score of an anomaly > score of a normal image) + ½ P(tie): the area under the ROC curve.

    AUROC = U / (n₁ n₀),   U = R₁ − n₁(n₁ + 1)/2,   R₁ = Σ of the anomalies' ranks among all scores
    (Mann–Whitney; ties get average ranks, which counts each tied pair as ½).
    """
    is_anomaly = is_anomaly.bool()
    n1, n0 = int(is_anomaly.sum()), int((~is_anomaly).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError(f"AUROC needs anomalies and normal images, got {n1} and {n0}")
    r1 = average_ranks(scores.double())[is_anomaly].sum().item()
    return (r1 - n1 * (n1 + 1) / 2) / (n1 * n0)


def roc_curve(scores, is_anomaly):
    """(false positive rate, true positive rate) at every threshold, from (0, 0) to (1, 1): one point
    per distinct score, so that tied scores make one diagonal step, whose area counts each tied
    (anomaly, normal) pair ½, as auroc does (a point per image would make a staircase in sort order)."""
    order = scores.argsort(descending=True)
    hits, ordered = is_anomaly[order].double(), scores[order]
    last_of_tie = torch.cat([ordered[1:] != ordered[:-1], torch.ones(1, dtype=torch.bool)])
    tpr = torch.cat([torch.zeros(1), (hits.cumsum(0) / hits.sum())[last_of_tie]])
    fpr = torch.cat([torch.zeros(1), ((1 - hits).cumsum(0) / (1 - hits).sum())[last_of_tie]])
    return fpr, tpr


# ---------------------------------------------------------------------------------------------
# Scores of a trained model
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def anomaly_scores(net, x, k, seed):
    """{score name: (n,) tensor on the CPU} for the images x, in batches; seeded. k = 0: no IW scores."""
    net.eval()
    parts = {name: [] for name in ("neg_elbo", "recon_error", "neg_log_px")[:3 if k else 2]}
    with data.seeded(x.device, seed):
        for xb, _ in data.batches(x, x, data.EVAL_BATCH_SIZE):
            x_logits, mu, logvar = net(xb)
            parts["neg_elbo"].append(-losses.elbo(xb, x_logits, mu, logvar)[0])
            x_mean = torch.sigmoid(net.decode(mu))                  # E[x|z = μ(x)]
            parts["recon_error"].append((xb - x_mean).pow(2).flatten(1).sum(1))
            if k:
                parts["neg_log_px"].append(-losses.iw_log_px(xb, net.encode, net.decode, k))
    scores = {name: torch.cat(p).cpu() for name, p in parts.items()}
    if k:
        scores["neg_log_px_minus_complexity"] = scores["neg_log_px"] - complexity_nats(x)
    return scores


def complexity_nats(x):
    """L(x): the length of each image compressed by DEFLATE (zlib level 9, PNG's compressor), in nats.

    The input-complexity correction of Serrà et al. 2020 (ICLR 2020, arXiv:1909.11480, their score S):
    S(x) = −log p(x) − L(x). Simple images (a thin 1) are likely under any model of digits and
    short to compress; the difference keeps what the model explains beyond a generic compressor.
    The compressor sees no training image, so the one-class protocol holds. Binary pixels are
    packed 8 to a byte; grey pixels are compressed as bytes 0..255.
    """
    pixels = x.flatten(1).cpu()
    binary = bool(((pixels == 0) | (pixels == 1)).all())
    as_bytes = np.packbits(pixels.numpy().astype(np.uint8), axis=1) if binary else (pixels * 255).round().byte().numpy()
    return torch.tensor([8 * math.log(2) * len(zlib.compress(row.tobytes(), 9)) for row in as_bytes])


def parse_digits(text):
    """'all' -> 0..9; '3,5' -> [3, 5]."""
    if text == "all":
        return list(range(10))
    try:
        digits = sorted({int(d) for d in text.split(",")})
    except ValueError:
        digits = []
    if not digits or not all(0 <= d <= 9 for d in digits):
        raise runs.UsageError(f"--one-class {text!r}: give 'all' or digits from 0 to 9 separated by commas, e.g. 3,8")
    return digits


def score_digit(net, d, x_test, y_test, k, seed):
    """The test images scored by digit d's model, the other nine digits the anomalies:
    {"auroc": {score name: AUROC}, "scores": {score name: (n,)}, "is_anomaly": (n,) bool}."""
    scores = anomaly_scores(net, x_test, k, seed)
    is_anomaly = (y_test != d).cpu()
    return {"auroc": {name: auroc(s, is_anomaly) for name, s in scores.items()}, "scores": scores,
            "is_anomaly": is_anomaly}


def print_digit(d, result):
    print(f"digit {d}: {result['train_images']} training images, {result['train_seconds']:.0f} s; AUROC % "
          + ", ".join(f"{SCORE_NAMES[n]} {100 * a:.1f}" for n, a in result["auroc"].items()))


def metrics(config, results):
    """The run's metrics.json: per digit its AUROCs and training facts, the means, the anchors.
    config: the run's configuration as a dict; results: {digit: score_digit's dict and more}."""
    per_digit = {d: {k: v for k, v in r.items() if k not in ("scores", "is_anomaly")} for d, r in results.items()}
    return {"config": config, "iw_samples": config["iw_samples"], "per_digit": per_digit,
            "mean_auroc": mean_aurocs(results), "deep_svdd_per_digit": DEEP_SVDD, "anchor_means": ANCHOR_MEANS}


def computed(results):
    """The score names a run computed, in SCORES order (no IW scores when --iw-samples is 0)."""
    return [name for name in SCORES if name in next(iter(results.values()))["auroc"]]


def mean_aurocs(results):
    """{score name: the AUROC averaged over the digits run}."""
    return {name: sum(r["auroc"][name] for r in results.values()) / len(results) for name in computed(results)}


def roc_figure(results, path, title):
    """One panel per score: the ROC curve of every digit's model, its AUROC in the legend."""
    means = mean_aurocs(results)
    fig, axes = figure(1, len(means), figsize=(3.9 * len(means), 4.3), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (name, mean) in zip(axes, means.items()):
        for d, r in results.items():
            fpr, tpr = roc_curve(r["scores"][name], r["is_anomaly"])
            ax.plot(fpr.numpy(), tpr.numpy(), color=colormaps["tab10"](d), lw=1.2, label=f"{d}: {100 * r['auroc'][name]:.1f}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":")
        ax.set_title(f"score: {SCORE_NAMES[name]}\nmean AUROC {100 * mean:.1f}%", fontsize=10)
        ax.set_xlabel("false positive rate (normal digits flagged)")
        ax.legend(title="normal digit: AUROC %", fontsize=7, title_fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("true positive rate (other digits flagged)")
    fig.suptitle(title, fontsize=10, y=1.03)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Several runs (seeds) of the same command: mean ± standard deviation, as Ruff et al. report
# ---------------------------------------------------------------------------------------------
def summarize(run_dirs):
    """{score: {digit or 'mean': (mean, std) of the AUROC % over the runs}} and the runs' seeds.

    The runs must differ in their seed only: the same digits, scores and every other setting, and
    two or more distinct seeds (a repeated seed would shrink the spread without measuring anything).
    """
    loaded = [read_run(r) for r in run_dirs]
    settings = [{k: v for k, v in run["config"].items() if k not in NOT_SETTINGS} for run in loaded]
    if any(s != settings[0] for s in settings) or any(run["per_digit"].keys() != loaded[0]["per_digit"].keys()
                                                       for run in loaded):
        raise runs.UsageError("these runs differ in more than their --seed: summarize runs of one command")
    seeds = [run["config"]["seed"] for run in loaded]
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise runs.UsageError(f"give two or more runs with distinct seeds, got seeds {seeds}: "
                              f"a mean ± std needs independent runs")
    # the mean ± std is runs.summarize's, the one summary of runs (sweep.py's too), on AUROCs in %
    percent = [{name: 100 * value for name, value in runs.end_metrics(r).items()} for r in run_dirs]
    stats = runs.summarize(percent, run_dirs)
    table = {}
    for name in loaded[0]["mean_auroc"]:
        rows = {d: f"per_digit.{d}.auroc.{name}" for d in loaded[0]["per_digit"]} | {"mean": f"mean_auroc.{name}"}
        table[name] = {d: (stats[key]["mean"], stats[key]["std"]) for d, key in rows.items()}
    return table, seeds


def read_run(run_dir):
    """The metrics.json of a --one-class run folder, or a UsageError."""
    run = runs.read_json(Path(run_dir) / "metrics.json")
    if not run.get("per_digit") or not run.get("mean_auroc"):
        raise runs.UsageError(f"{run_dir}: no metrics.json of a --one-class run there (main.py --one-class writes one)")
    return run


def print_summary(table, seeds):
    """The summary as a Markdown table, one column per score, Deep SVDD's per-digit numbers beside."""
    names = list(table)
    print(f"AUROC %, mean ± std over {len(seeds)} runs (seeds {', '.join(map(str, seeds))})\n")
    print("| normal digit | One-class Deep SVDD | " + " | ".join(f"VAE {SCORE_NAMES[n]}" for n in names) + " |")
    print("| --- " * (len(names) + 2) + "|")
    digits = [int(d) for d in table[names[0]] if d != "mean"]
    for d in table[names[0]]:      # the mean row: Deep SVDD's mean over the same digits
        anchor = DEEP_SVDD[int(d)] if d != "mean" else round(sum(DEEP_SVDD[i] for i in digits) / len(digits), 1)
        print(f"| {d} | {anchor} | " + " | ".join("{:.1f} ± {:.1f}".format(*table[n][d]) for n in names) + " |")


def cli(run_dirs):
    """python anomaly.py RUN_DIR...: the summary, or one line and exit code 2."""
    try:
        if not run_dirs:
            raise runs.UsageError("give the run folders of --one-class runs: python anomaly.py results/anomaly-mlp-*/")
        print_summary(*summarize(run_dirs))
    except runs.UsageError as e:
        runs.fail(str(e))


if __name__ == "__main__":
    cli(sys.argv[1:])
