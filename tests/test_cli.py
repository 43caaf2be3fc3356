"""main.py end to end, on tiny IDX files the tests write: one training run through a subprocess
(the real command line), everything else through main.main(argv) in this process, which is faster."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, main_in_process

import main
import viz

PAIRS = [(kind, arch) for kind in ("vae", "cvae") for arch in ("mlp", "conv")]


# A subprocess runs with one thread: its numbers are compared bit for bit with runs in the test
# process (which pins one thread too, tests/conftest.py), and float sums split over more
# threads, or over as many as MKL sees fit on a busy machine, round differently.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_main(*args, cwd=ROOT):
    """main.py in a subprocess; the timeout only stops a hang, it is no measure of speed."""
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=1800, env=ONE_THREAD)


def check_run_folder(run_dir, kind, epochs, drawn=True):
    expected = {"checkpoint.pt", "best.pt", "metrics.json"} | (pictures(kind) | {"explorer.html"} if drawn else set())
    assert {p.name for p in run_dir.iterdir()} == expected
    for png in run_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 500
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["model"] == kind
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, epochs + 1))
    for row in metrics["epochs"]:
        for key in ("train_neg_elbo", "val_neg_elbo", "val_recon", "val_kl", "train_seconds"):
            assert isinstance(row[key], float)
        assert not any(key.startswith("test_") for key in row)           # the test set is read once, at the end
        # both terms of the −ELBO are non-negative for pixels in [0, 1]
        assert row["val_recon"] > 0 and row["val_kl"] >= 0
    # the final report is on best.pt, the epoch of the lowest validation −ELBO, and its test −ELBO
    # (main.final_report's own pass over the test set) is the one that epoch's row recorded
    best = min(metrics["epochs"], key=lambda row: row["val_neg_elbo"])
    assert metrics["final"]["epoch"] == best["epoch"]
    assert metrics["final"]["test_neg_elbo"] != pytest.approx(best["val_neg_elbo"], rel=1e-9)   # another set
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "config", "epoch"} and ckpt["epoch"] == epochs
    check_report(metrics["final"], kind)
    return metrics


def check_report(report, kind):
    """The end-of-run report on the test set: NLL in nats and bits/dim, active units, KL per dim."""
    assert report["test_nll"] > 0
    assert report["test_bits_per_dim"] == pytest.approx(report["test_nll"] / (784 * math.log(2)))
    assert 0 <= report["active_units"] <= len(report["kl_per_dim"]) == len(report["unit_variance"])
    # Σ_j of the test means of KL_j (latent_diagnostics) = the test mean of Σ_j KL_j (evaluate's ELBO):
    # one number, summed in two orders, so equal up to float rounding
    assert sum(report["kl_per_dim"]) == pytest.approx(report["test_kl"], rel=1e-5)
    if kind == "cvae":
        accuracy = report["sample_accuracy"]
        assert 0 <= accuracy["overall"] <= 1 and len(accuracy["per_digit"]) == 10


def pictures(kind):
    """The pictures of a run with the VAE's latent 3 and the CVAE's latent 2 (which adds the manifold)."""
    names = {"reconstructions.png", "samples.png", "samples_10.png", "loss_curves.png", "kl_per_dim.png", "latent_space.png",
             "interpolations.png", "traversals.png", "completions.png", "anomaly_histogram.png",
             "least_likely.png"}
    return names | ({"samples_by_class.png", "analogies.png", "manifold.png"} if kind == "cvae" else set())


def recording_draw_run(monkeypatch):
    """Replace viz.draw_run by a stand-in that draws nothing and notes (model kind, run folder), and
    main.write_page, which then has no pictures to link, by one that writes nothing."""
    calls = []
    monkeypatch.setattr(viz, "draw_run", lambda net, *args: calls.append((type(net).__name__, Path(args[-2]))))
    monkeypatch.setattr(main, "write_page", lambda *args: None)
    return calls


@pytest.mark.parametrize("kind,arch", PAIRS)
def test_train_then_eval_writes_every_output(tiny_mnist, tmp_path, capsys, monkeypatch, kind, arch):
    """Small networks (the outputs, not the fit, are the claim). The pictures are drawn once per model
    kind: the VAE's by the real command line (vae, mlp), the CVAE's by the (cvae, mlp) training run;
    every other run here must call the same viz.draw_run on its own folder, which is checked instead."""
    out = tmp_path / "results"
    small = ["--hidden-dim", 32] + (["--conv-channels", "4,8"] if arch == "conv" else [])
    args = ["--model", kind, "--arch", arch, "--epochs", 2, "--batch-size", 32, "--val-size", 16, *small,
            "--iw-samples", 4, "--latent-dim", 3 if kind == "vae" else 2, "--data-dir", tiny_mnist, "--out-dir", out]
    drawn = arch == "mlp"
    if (kind, arch) == ("vae", "mlp"):          # one pair through the real command line, the rest faster
        result = run_main(*args)
        assert result.returncode == 0, result.stderr
    else:
        calls = [] if drawn else recording_draw_run(monkeypatch)
        code, _, err = main_in_process(capsys, *args)
        assert code == 0, err
    (run_dir,) = out.iterdir()
    if not drawn:
        assert calls == [(kind.upper(), run_dir)]
    metrics = check_run_folder(run_dir, kind, epochs=2, drawn=drawn)

    # --eval redraws with the same viz.draw_run the training run used (whose pictures are checked above)
    calls = recording_draw_run(monkeypatch)
    code, _, err = main_in_process(capsys, "--eval", run_dir / "best.pt", "--data-dir", tiny_mnist,
                                   "--out-dir", out)
    assert code == 0, err
    (eval_dir,) = [p for p in out.iterdir() if p.name.startswith("eval-")]
    assert calls == [(kind.upper(), eval_dir)]
    assert {p.name for p in eval_dir.iterdir()} == {"metrics.json"}
    evaluation = json.loads((eval_dir / "metrics.json").read_text())["eval"]
    check_report(evaluation, kind)
    # same seed, same model (best.pt), same test set: --eval reproduces the final report's test numbers
    assert evaluation["test_neg_elbo"] == pytest.approx(metrics["final"]["test_neg_elbo"], rel=1e-5)


def test_both_models_by_default_and_no_run_overwrites_another(tiny_mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(viz, "draw_run", lambda *args, **kwargs: None)     # pictures: the test above
    monkeypatch.setattr(main, "write_page", lambda *args, **kwargs: None)
    out = tmp_path / "results"
    for _ in range(2):
        code, _, err = main_in_process(capsys, "--epochs", 1, "--max-batches", 1, "--val-size", 16,
                                       "--iw-samples", 2, "--data-dir", tiny_mnist, "--out-dir", out)
        assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 4 and sum(n.startswith("vae-") for n in names) == 2


def test_help_lists_every_hyperparameter_with_its_default(capsys):
    code, out, _ = main_in_process(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())                  # argparse wraps long lines
    for name, value in vars(main.Config()).items():
        assert f"--{name.replace('_', '-')}" in text
        assert f"default: {value!r}" in text


@pytest.mark.parametrize("args,message", [
    (["--model", "gan"], "invalid choice"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "-5"], "--batch-size must be at least 1"),
    (["--latent-dim", "0"], "--latent-dim must be at least 1"),
    (["--cvae-latent-dim", "0"], "--cvae-latent-dim must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "abc"], "invalid float value"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--eval", "missing.pt"], "no checkpoint at missing.pt"),
])
def test_bad_input_gets_one_line_and_exit_code_2(tiny_mnist, tmp_path, capsys, args, message):
    code, _, err = main_in_process(capsys, *args, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()                 # refused before anything was written


def test_bad_input_gets_exactly_the_error_line_and_no_traceback(tiny_mnist, capsys):
    # main.main is what `python main.py` runs: an exception that escaped runs.one_line_errors would
    # reach pytest here as that exception, not as SystemExit, and fail the test
    code, out, err = main_in_process(capsys, "--epochs", "-3", "--data-dir", tiny_mnist)
    assert code == 2 and out == ""
    assert err.strip() == "error: --epochs must be at least 1, got -3"


def test_a_file_that_is_not_a_checkpoint_is_refused(tiny_mnist, tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint")
    code, _, err = main_in_process(capsys, "--eval", bogus, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 2 and "is not a usable checkpoint" in err and len(err.strip().splitlines()) == 1


def test_truncated_data_is_refused_with_a_hint(tiny_mnist, tmp_path, capsys):
    images = tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    code, _, err = main_in_process(capsys, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 2 and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1
