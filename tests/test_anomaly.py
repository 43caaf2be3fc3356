"""One-class anomaly detection (anomaly.py): the rank-based AUROC against a count of pairs, the
ROC curve against the AUROC, its orientation where the mode calls it (a model of one digit must
find the other digits anomalous), and --one-class end to end on tiny fake MNIST."""
import json
import math
import zlib

import numpy as np
import pytest
import torch

from conftest import bar, fake_digits, main_in_process, painting_vae

import anomaly
import main
import runs


def pair_count_auroc(scores, is_anomaly):
    """P(anomaly scores higher) + ½ P(tie), by looking at every (anomaly, normal) pair."""
    pos, neg = scores[is_anomaly], scores[~is_anomaly]
    wins = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return (wins / (len(pos) * len(neg))).item()


@pytest.mark.parametrize("seed,n_values", [(0, 3), (1, 10), (2, 1000)])   # many ties ... almost none
def test_auroc_is_the_pair_count_with_ties_counted_half(seed, n_values):
    generator = torch.Generator().manual_seed(seed)
    is_anomaly = torch.rand(300, generator=generator) < 0.3
    scores = torch.randint(0, n_values, (300,), generator=generator).float() + is_anomaly.float()
    assert anomaly.auroc(scores, is_anomaly) == pytest.approx(pair_count_auroc(scores, is_anomaly), abs=1e-12)


def test_average_ranks_share_the_ranks_of_a_tie():
    scores = torch.tensor([10.0, 20.0, 10.0, 5.0, 20.0, 20.0])
    # 5 -> 1; the two 10s share ranks 2, 3; the three 20s share 4, 5, 6
    assert anomaly.average_ranks(scores).tolist() == [2.5, 5.0, 2.5, 1.0, 5.0, 5.0, ]


def test_auroc_extremes_and_bad_input():
    is_anomaly = torch.tensor([False, False, True, True])
    assert anomaly.auroc(torch.tensor([0.0, 1.0, 2.0, 3.0]), is_anomaly) == 1.0
    assert anomaly.auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), is_anomaly) == 0.0
    assert anomaly.auroc(torch.ones(4), is_anomaly) == 0.5           # all tied: chance
    with pytest.raises(ValueError, match="anomalies and normal images"):
        anomaly.auroc(torch.ones(4), torch.zeros(4, dtype=torch.bool))


@pytest.mark.parametrize("n_values", [3, 10, 0])                    # many ties, some, none (continuous)
def test_the_area_under_the_drawn_roc_curve_is_the_pair_count(n_values):
    """The curve's trapezoids against every (anomaly, normal) pair, ties counted ½ (Mann–Whitney)."""
    generator = torch.Generator().manual_seed(3)
    is_anomaly = torch.rand(500, generator=generator) < 0.5
    noise = torch.randint(0, n_values, (500,), generator=generator).float() if n_values else torch.randn(500, generator=generator)
    scores = noise + is_anomaly.float()
    fpr, tpr = anomaly.roc_curve(scores, is_anomaly)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and len(fpr) == len(scores.unique()) + 1
    assert np.trapezoid(tpr.numpy(), fpr.numpy()) == pytest.approx(pair_count_auroc(scores, is_anomaly), abs=1e-9)


def test_digits_are_parsed_or_refused():
    assert anomaly.parse_digits("all") == list(range(10))
    assert anomaly.parse_digits("8,3,8") == [3, 8]
    for bad in ("12", "a", "", "3,-1"):
        with pytest.raises(runs.UsageError, match="--one-class"):
            anomaly.parse_digits(bad)


def test_one_class_end_to_end(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "results"
    code, _, err = main_in_process(capsys, "--one-class", "3,5", "--model", "vae", "--epochs", "2",
                                   "--batch-size", "16", "--latent-dim", "2", "--hidden-dim", "16", "--iw-samples", "3",
                                   "--binarize", "dynamic", "--data-dir", tiny_mnist, "--out-dir", out)
    assert code == 0, err
    (run_dir,) = out.iterdir()
    assert {p.name for p in run_dir.iterdir()} == {"metrics.json", "roc.png", "digit3.pt", "digit5.pt"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(metrics["per_digit"]) == ["3", "5"]
    for row in metrics["per_digit"].values():
        assert set(row["auroc"]) == set(anomaly.SCORES) and all(0 <= a <= 1 for a in row["auroc"].values())
    for name in anomaly.SCORES:
        mean = np.mean([row["auroc"][name] for row in metrics["per_digit"].values()])
        assert metrics["mean_auroc"][name] == pytest.approx(mean)
    net, ckpt = runs.read_checkpoint(run_dir / "digit3.pt", torch.device("cpu"))
    assert ckpt["config"]["model"] == "vae" and "one_class" not in ckpt["config"] and ckpt["epoch"] == 2


def test_runs_over_seeds_are_summarized_as_mean_and_std(tiny_mnist, tmp_path, capsys):
    """--iw-samples 0 skips the IW scores; anomaly.summarize averages runs that differ in the seed only."""
    common = ["--one-class", "3,5", "--model", "vae", "--epochs", "1", "--batch-size", "16", "--latent-dim", "2",
              "--hidden-dim", "16", "--iw-samples", "0", "--data-dir", tiny_mnist]
    for seed in (1, 2):
        code, _, err = main_in_process(capsys, *common, "--seed", seed, "--out-dir", tmp_path / f"s{seed}")
        assert code == 0, err
    run_dirs = [next((tmp_path / f"s{seed}").iterdir()) for seed in (1, 2)]
    metrics = [json.loads((r / "metrics.json").read_text()) for r in run_dirs]
    assert set(metrics[0]["mean_auroc"]) == {"neg_elbo", "recon_error"}          # no IW scores with K = 0
    assert (run_dirs[0] / "roc.png").read_bytes()[:4] == b"\x89PNG"
    table, seeds = anomaly.summarize(run_dirs)
    assert seeds == [1, 2] and set(table) == {"neg_elbo", "recon_error"}
    for name in table:
        for d in ("3", "5"):
            a = [100 * m["per_digit"][d]["auroc"][name] for m in metrics]
            assert table[name][d] == pytest.approx((np.mean(a), np.std(a, ddof=1)))
        assert table[name]["mean"][0] == pytest.approx(np.mean([100 * m["mean_auroc"][name] for m in metrics]))
    # python anomaly.py RUN...: the table, Deep SVDD's mean over the same digits (3, 5: 91.9 and 88.5)
    anomaly.cli(run_dirs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("AUROC %, mean ± std over 2 runs (seeds 1, 2)")
    assert lines[-1] == "| mean | 90.2 | " + " | ".join(
        "{:.1f} ± {:.1f}".format(*table[name]["mean"]) for name in ("neg_elbo", "recon_error")) + " |"
    code, _, err = main_in_process(capsys, *common, "--epochs", "2", "--out-dir", tmp_path / "e2")
    assert code == 0, err
    with pytest.raises(runs.UsageError, match="differ in more than their --seed"):
        anomaly.summarize([run_dirs[0], next((tmp_path / "e2").iterdir())])
    with pytest.raises(runs.UsageError, match="two or more runs with distinct seeds, got seeds \\[1, 1\\]"):
        anomaly.summarize([run_dirs[0], run_dirs[0]])
    with pytest.raises(runs.UsageError, match="two or more runs"):
        anomaly.summarize([run_dirs[0]])
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "metrics.json").write_text("[1, 2]")
    for folder in (tmp_path, tmp_path / "list"):
        with pytest.raises(SystemExit) as exit:
            anomaly.cli([folder])
        assert exit.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
            f"error: {folder}: no metrics.json of a --one-class run there (main.py --one-class writes one)"]
    with pytest.raises(SystemExit) as exit:
        anomaly.cli([])
    assert exit.value.code == 2 and "give the run folders" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--one-class", "12"], "--one-class '12'"),
    (["--one-class", "3", "--model", "cvae"], "use --model vae"),
])
def test_bad_one_class_input_gets_one_line_and_exit_code_2(tiny_mnist, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main.main([*args, "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_complexity_is_the_deflate_length_and_grows_with_the_ink():
    blank, noisy = torch.zeros(1, 1, 28, 28), torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = torch.cat([blank, noisy.round()])
    lengths = anomaly.complexity_nats(x)
    expected = len(zlib.compress(np.packbits(x[1].flatten().numpy().astype(np.uint8)).tobytes(), 9))
    assert lengths[1].item() == pytest.approx(8 * math.log(2) * expected)
    assert lengths[0] < lengths[1]                 # a blank image compresses to less than noise
    assert anomaly.complexity_nats(noisy).item() > lengths[1].item()     # grey bytes: longer still


# ---------------------------------------------------------------------------------------------
# Orientation: a model that draws digit d must score the other digits as the anomalies
# ---------------------------------------------------------------------------------------------
def binary_bars(n=60, seed=0):
    images, labels = fake_digits(n, seed)
    return (torch.tensor(images) > 127).float().unsqueeze(1), torch.tensor(labels)   # the bars, no noise


@pytest.mark.parametrize("k", [0, 3])
def test_a_model_of_the_digit_finds_the_other_digits_anomalous(k):
    x, y = binary_bars()
    result = anomaly.score_digit(painting_vae(bar([3])), 3, x, y, k, seed=0)
    assert set(result["auroc"]) == set(anomaly.SCORES[:4 if k else 2])
    assert all(a > 0.99 for a in result["auroc"].values()), result["auroc"]
    # flipped: a model that draws every digit's bar but 3's finds the 3s the least likely images
    result = anomaly.score_digit(painting_vae(bar([d for d in range(10) if d != 3])), 3, x, y, k, seed=0)
    assert all(a < 0.01 for a in result["auroc"].values()), result["auroc"]


def test_the_one_class_mode_scores_each_digit_with_the_model_of_that_digit(tiny_mnist, tmp_path, capsys,
                                                                           monkeypatch):
    """--one-class with a stand-in for the training: each digit's "model" draws the bar its training
    images share. Every score must find the other digits anomalous (AUROC near 1) for every digit,
    which fails if the mode trains on another digit's images, scores against another digit's labels,
    or turns the scores' sign."""
    def fit_the_bar(x, cfg, device, run_dir):
        return painting_vae((x.mean(0)[0] > 0.5).float()), [{"epoch": 1, "train_neg_elbo": 0.0}]
    monkeypatch.setattr(main, "train_one_class", fit_the_bar)
    out = tmp_path / "results"
    code, _, err = main_in_process(capsys, "--one-class", "3,5", "--epochs", "1", "--iw-samples", "3",
                                   "--binarize", "dynamic", "--data-dir", tiny_mnist, "--out-dir", out)
    assert code == 0, err
    metrics = json.loads((next(out.iterdir()) / "metrics.json").read_text())
    assert sorted(metrics["per_digit"]) == ["3", "5"]
    for digit, row in metrics["per_digit"].items():
        assert set(row["auroc"]) == set(anomaly.SCORES)
        assert all(a > 0.99 for a in row["auroc"].values()), (digit, row["auroc"])


def test_an_interrupted_one_class_run_says_which_digits_it_holds(tiny_mnist, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the second digit trains: exit code 130 and a line naming the finished digit."""
    real, calls = main.train_epoch, []

    def interrupted_in_the_second_digit(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(main, "train_epoch", interrupted_in_the_second_digit)
    code, _, err = main_in_process(capsys, "--one-class", "3,5", "--epochs", "1", "--iw-samples", "0",
                                   "--data-dir", tiny_mnist, "--out-dir", tmp_path)
    last = err.strip().splitlines()[-1]                   # after the progress bar's carriage returns
    assert code == 130 and "Traceback" not in err, err
    assert last.split("error: ")[-1].startswith("interrupted: ") and last.endswith("digits [3]"), err
