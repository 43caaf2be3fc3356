"""Never lose a run, never crash on bad input: resume, Ctrl-C, the NaN guard, determinism, and the
one-line errors, on tiny IDX files. Ctrl-C and kill are checked on a real process (a subprocess);
everything else goes through main.main in this process, which is faster: main.main is what
`python main.py` runs, exit codes arrive as SystemExit and the one-line errors on stderr."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, interrupted_in_epoch, main_in_process, make_tiny_mnist
import main
import data
import judge
import runs
import viz
from test_cli import ONE_THREAD

# 96 training images less 16 for validation: 5 steps of 16 an epoch, on a small MLP
TINY = ["--model", "vae", "--batch-size", 16, "--val-size", 16, "--latent-dim", 3, "--hidden-dim", 32,
        "--iw-samples", 5]


@contextlib.contextmanager
def no_pictures():
    """Runs in this process skip the pictures (tests/test_cli.py and test_viz.py check those). Like
    every test they run on one thread (tests/conftest.py), as the subprocesses do (test_cli.ONE_THREAD):
    runs are compared bit for bit across the two, and a float sum split over another number of
    threads rounds differently."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(viz, "draw_run", lambda *args, **kwargs: None)
        patch.setattr(main, "write_page", lambda *args, **kwargs: None)
        yield


@pytest.fixture(autouse=True)
def no_pictures_here():
    with no_pictures():
        yield


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timings(metrics):
    """metrics.json minus the wall-clock seconds and the output folder, which no two runs share."""
    rows = [{k: v for k, v in row.items() if k != "train_seconds"} for row in metrics["epochs"]]
    rest = {k: v for k, v in metrics.items() if k not in ("provenance", "earlier_provenance")}
    return {**rest, "epochs": rows, "config": {**metrics["config"], "out_dir": None}}


def train_tiny(data_dir, out, *args):
    """A tiny training run through main.main in this process; it exits (SystemExit) only on an error."""
    main.main(list(map(str, [*TINY, "--data-dir", data_dir, "--out-dir", out, *args])))


def only_run(out):
    (run_dir,) = out.iterdir()
    return run_dir


def test_same_seed_gives_bit_identical_runs_on_the_cpu(tiny_mnist, tmp_path):
    # whatever ran before in this process (other tests' runs, their random draws) must not matter;
    # the Ctrl-C test below compares a run finished here with one begun in another process
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(1234 if name == "a" else 4321)          # a different global state each time
        train_tiny(tiny_mnist, tmp_path / name, "--epochs", 2, "--binarize", "dynamic", "--device", "cpu")
        runs.append(only_run(tmp_path / name))
    a, b = (json.loads((r / "metrics.json").read_text()) for r in runs)
    assert without_timings(a) == without_timings(b)
    assert same_weights(weights(runs[0] / "checkpoint.pt"), weights(runs[1] / "checkpoint.pt"))
    # and a different seed really is a different run
    train_tiny(tiny_mnist, tmp_path / "c", "--epochs", 2, "--binarize", "dynamic", "--seed", 2)
    c = json.loads((only_run(tmp_path / "c") / "metrics.json").read_text())
    assert c["epochs"][-1]["train_neg_elbo"] != a["epochs"][-1]["train_neg_elbo"]


def test_a_run_stopped_after_epoch_2_and_resumed_ends_exactly_like_the_uninterrupted_one(tiny_mnist, tmp_path,
                                                                                          capsys):
    # dynamic binarization, KL warm-up and the IWAE learning-rate schedule: every random stream and
    # every schedule must carry across the break (the IWAE schedule does not depend on --epochs)
    args = ["--binarize", "dynamic", "--warmup-epochs", 3, "--lr-schedule", "iwae"]
    train_tiny(tiny_mnist, tmp_path / "whole", "--epochs", 5, *args)
    train_tiny(tiny_mnist, tmp_path / "parts", "--epochs", 2, *args)
    whole, parts = only_run(tmp_path / "whole"), only_run(tmp_path / "parts")
    main.main(["--resume", str(parts / "checkpoint.pt"), "--epochs", "5", "--data-dir", str(tiny_mnist), "--iw-samples", "5"])
    assert "resuming" in capsys.readouterr().out
    assert same_weights(weights(parts / "checkpoint.pt"), weights(whole / "checkpoint.pt"))
    assert same_weights(weights(parts / "best.pt"), weights(whole / "best.pt"))
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (whole, parts))
    assert b.pop("earlier_finals")[0]["run_epochs"] == 2          # the 2-epoch run's report, kept
    assert without_timings(a) == without_timings(b)


# The child trains as main.py does, but its first training step of epoch 2 waits, forever, for the
# signal: so the signal always lands at the same place (inside an epoch, the progress bar open,
# epoch 1's checkpoint on disk), not wherever a sleep happened to end on a loaded machine.
PAUSE_IN_EPOCH_2 = """
import pathlib, sys, time
import torch
sys.path.insert(0, {root!r})
import main
import runs
real, steps = main.elbo_terms, []

def pausing(net, x, y, bf16=False):           # TINY: 5 training steps an epoch
    if torch.is_grad_enabled():
        steps.append(1)
        if len(steps) == 6:
            pathlib.Path({marker!r}).write_text("waiting")
            while True:
                time.sleep(1)
    return real(net, x, y, bf16)

main.elbo_terms = pausing
runs.stop_on_sigterm()
main.main(sys.argv[1:])
"""


def wait_for(path, proc, limit=600):
    """Until path exists; fails at once if the child ended first. The limit only stops a hang."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"the child ended with code {proc.returncode} before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {limit} s"
        time.sleep(0.05)


# SIGINT is Ctrl-C in a terminal; SIGTERM is `kill PID`, how a job started with nohup or & (which
# ignores SIGINT) is stopped
SIGNALS = [signal.SIGINT, signal.SIGTERM]


@pytest.fixture(scope="module")
def paused_children(tmp_path_factory):
    """{signal: (child process, its folder)}: one paused child for each signal, started together so
    that their start-ups (seconds of importing torch each) overlap; killed at the end if still there."""
    children = {}
    for stop in SIGNALS:
        folder = tmp_path_factory.mktemp(f"signal{int(stop)}")
        data_dir, out, marker = make_tiny_mnist(folder / "data"), folder / "run", folder / "waiting"
        code = PAUSE_IN_EPOCH_2.format(root=str(ROOT), marker=str(marker))
        with open(folder / "stderr.txt", "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-c", code, *map(str, TINY), "--epochs", "3",
                                     "--data-dir", str(data_dir), "--out-dir", str(out)],
                                    cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=stderr,
                                    # a shell running us in the background ignores SIGINT, and its children
                                    # inherit that; give the child the default, as a terminal would
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        children[stop] = proc, folder
    yield children
    for proc, _ in children.values():                               # never leave one running
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("stop", SIGNALS)
def test_ctrl_c_or_kill_keeps_the_last_epoch_and_the_run_resumes_to_the_same_weights(paused_children, stop,
                                                                                      uninterrupted_3_epochs, tiny_mnist):
    proc, folder = paused_children[stop]
    out, marker, log = folder / "run", folder / "waiting", folder / "stderr.txt"
    try:
        wait_for(marker, proc)
        assert (only_run(out) / "checkpoint.pt").is_file()          # epoch 1's, seen on disk
        proc.send_signal(stop)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]                   # after the progress bars on stderr
    assert last.startswith("error: interrupted") and "--resume" in last and "Traceback" not in err, err
    run_dir = only_run(out)
    assert not list(run_dir.glob("*.tmp"))                 # no half-written file left behind
    assert not (run_dir / "writer.lock").exists()          # nor a lock that would refuse the resume
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1 and "holds epoch 1" in err
    main.main(["--resume", str(run_dir / "checkpoint.pt"), "--epochs", "3", "--data-dir", str(tiny_mnist)])
    assert same_weights(weights(run_dir / "checkpoint.pt"), weights(uninterrupted_3_epochs / "checkpoint.pt"))


def train_once(tmp_path_factory, epochs):
    """A tiny run of `epochs` epochs on its own tiny MNIST, without pictures; its run folder."""
    data_dir, out = make_tiny_mnist(tmp_path_factory.mktemp("data")), tmp_path_factory.mktemp("runs")
    with no_pictures():
        train_tiny(data_dir, out, "--epochs", epochs)
    return only_run(out)


@pytest.fixture(scope="module")
def uninterrupted_3_epochs(tmp_path_factory):
    """The run the stopped-and-resumed ones must match, trained once for both signals."""
    return train_once(tmp_path_factory, 3)


def test_a_diverging_run_stops_with_epoch_and_batch_and_exit_code_1(tiny_mnist, tmp_path, capsys):
    code, _, err = main_in_process(capsys, *TINY, "--epochs", 2, "--lr", 1e30, "--data-dir", tiny_mnist,
                                   "--out-dir", tmp_path)
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]                      # after the progress bar
    assert "epoch 1, batch" in line and "--lr" in line and "no checkpoint" in line


def test_divergence_after_a_good_epoch_keeps_that_epochs_checkpoint(tiny_mnist, tmp_path, capsys, monkeypatch):
    import losses
    calls = {"n": 0}
    real = losses.log_bernoulli

    def poisoned_after_epoch_1(x, x_logits):            # 5 training batches an epoch, then eval
        calls["n"] += 1
        log_px = real(x, x_logits)
        return log_px * float("nan") if torch.is_grad_enabled() and calls["n"] > 5 else log_px

    monkeypatch.setattr(losses, "log_bernoulli", poisoned_after_epoch_1)
    code, _, err = main_in_process(capsys, *TINY, "--epochs", 3, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 1
    assert "became nan at epoch 2, batch 1" in err and "holds epoch 1" in err
    ckpt = torch.load(only_run(tmp_path / "out") / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_best_checkpoint_and_early_stopping_follow_the_validation_elbo(tiny_mnist, tmp_path, monkeypatch):
    # a validation curve that falls to its minimum at epoch 3, then rises: with patience 2 the run
    # must stop after epoch 5, keep epoch 3 in best.pt, and report on epoch 3
    real_evaluate = main.evaluate
    curve = iter([50.0, 40.0, 30.0, 35.0, 45.0, 60.0, 70.0, 80.0])

    def fake_val(net, x, y, seed, max_batches=0, prefix="test"):
        row, neg_elbo = real_evaluate(net, x, y, seed, max_batches, prefix)
        return ({**row, "val_neg_elbo": next(curve)} if prefix == "val" else row), neg_elbo

    monkeypatch.setattr(main, "evaluate", fake_val)
    train_tiny(tiny_mnist, tmp_path / "out", "--epochs", 8, "--patience", 2)
    run_dir = only_run(tmp_path / "out")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2, 3, 4, 5]
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 3
    assert metrics["final"]["epoch"] == 3
    best = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    assert not same_weights(best, weights(run_dir / "checkpoint.pt"))     # the report used best.pt


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback, nothing written or overwritten
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--hidden-layers", "0"], "--hidden-layers must be at least 1"),
    (["--iw-samples", "-1"], "--iw-samples must be 0 or more"),
    (["--adam-eps", "0"], "--adam-eps must be a positive number"),
    (["--patience", "3", "--val-size", "0"], "--patience needs a validation set"),
    (["--val-size", "96"], "--val-size 96 leaves no training images"),
    (["--activation", "sigmoid"], "invalid choice"),
    (["--binarize", "static"], "invalid choice"),
    (["--resume", "missing.pt"], "no checkpoint at missing.pt"),
    (["--seed", "18446744073709551616"], "--seed must be from 0 to 2**64 - 1"),    # 2**64: past torch.manual_seed's range
    (["--seed", "-1"], "--seed must be from 0 to 2**64 - 1"),
])
def test_more_bad_input_gets_one_line_and_exit_code_2(tiny_mnist, tmp_path, capsys, args, message):
    code, _, err = main_in_process(capsys, *args, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["cuda", "mps", "xpu", "cuda:7"])
def test_an_absent_accelerator_is_refused_in_one_line(tiny_mnist, tmp_path, capsys, device):
    here = torch.accelerator.current_accelerator(check_available=True)
    if here is not None and here.type == device.split(":")[0] and device != "cuda:7":
        pytest.skip(f"this machine has {here.type}")
    code, _, err = main_in_process(capsys, "--device", device, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 2 and f"--device {device}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_device_name_torch_does_not_know_is_refused(tiny_mnist, tmp_path, capsys):
    code, _, err = main_in_process(capsys, "--device", "gpu", "--data-dir", tiny_mnist, "--out-dir", tmp_path)
    assert code == 2 and "--device gpu: not a device name" in err


def fake_accelerator(monkeypatch, kind, count=1, autocast=True):
    """Make torch report an accelerator of type `kind` with `count` devices (pick_device's view)."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device(kind))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: autocast or device_type == "cpu")


def test_auto_picks_whichever_accelerator_torch_reports(monkeypatch):
    for kind in ("cuda", "mps", "xpu"):
        fake_accelerator(monkeypatch, kind)
        assert runs.pick_device("auto") == torch.device(kind)
        assert runs.pick_device("cpu") == torch.device("cpu")            # the CPU is always allowed
        other = "mps" if kind != "mps" else "cuda"
        with pytest.raises(runs.UsageError, match=f"{other} is not available .this machine's accelerator is {kind}"):
            runs.pick_device(other)
    fake_accelerator(monkeypatch, "cuda", count=2)
    assert runs.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(runs.UsageError, match="there are only 2 cuda devices"):
        runs.pick_device("cuda:2")


def test_bf16_is_refused_where_the_device_has_no_autocast(monkeypatch):
    fake_accelerator(monkeypatch, "xla", autocast=False)
    with pytest.raises(runs.UsageError, match="--precision bf16 needs torch.autocast, which xla lacks"):
        runs.pick_device("auto", "bf16")
    assert runs.pick_device("auto", "fp32") == torch.device("xla")


def test_the_fused_adam_takes_the_steps_of_torchs_plain_adam():
    """On the CPU make_optimizer picks the fused kernel; its steps are the per-parameter loop's (a
    second implementation, torch's foreach=False) to float rounding. On a device without the kernel
    (here: meta) it leaves the choice to torch."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = main.make_optimizer(nets[0], 1e-2, 1e-8)
    plain = torch.optim.Adam(nets[1].parameters(), lr=1e-2, eps=1e-8, foreach=False)
    assert fused.defaults["fused"]
    x = torch.randn(5, 3)
    for _ in range(10):
        for net, optimizer in zip(nets, (fused, plain)):
            optimizer.zero_grad()
            net(x).pow(2).sum().backward()
            optimizer.step()
    for p, q in zip(*(net.parameters() for net in nets)):
        torch.testing.assert_close(p, q)
    assert not torch.equal(nets[0][0].weight, torch.nn.Linear(3, 4).weight)        # they moved
    assert main.make_optimizer(torch.nn.Linear(2, 2, device="meta"), 1e-3, 1e-8).defaults["fused"] is None


def test_bad_conv_channels_get_one_line(tiny_mnist, tmp_path, capsys):
    code, _, err = main_in_process(capsys, "--arch", "conv", "--conv-channels", "32", "--data-dir", tiny_mnist,
                                   "--out-dir", tmp_path)
    assert code == 2 and "--conv-channels '32': give two or more" in err and len(err.strip().splitlines()) == 1


def test_an_output_directory_that_cannot_be_written_is_refused(tiny_mnist, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = main_in_process(capsys, *TINY, "--epochs", 1, "--data-dir", tiny_mnist, "--out-dir", blocker / "out")
    assert code == 2 and "cannot create a run folder" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A 1-epoch run, trained once; the tests below get copies of it (trained_run)."""
    return train_once(tmp_path_factory, 1)


@pytest.fixture
def trained_run(trained_once, tmp_path):
    """A copy of the 1-epoch run for a test to resume, damage or check was left alone."""
    return shutil.copytree(trained_once, tmp_path / "runs" / trained_once.name)


def test_truncated_checkpoint_is_refused_and_nothing_is_overwritten(trained_run, tiny_mnist, tmp_path, capsys):
    good = (trained_run / "checkpoint.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[:len(good) // 2])
    for option in ("--eval", "--resume"):
        code, _, err = main_in_process(capsys, option, cut, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "o")
        assert code == 2 and "not a usable checkpoint" in err and len(err.strip().splitlines()) == 1
    assert (trained_run / "checkpoint.pt").read_bytes() == good and not (tmp_path / "o").exists()


def test_checkpoint_of_another_architecture_names_the_shapes(trained_run, tiny_mnist, tmp_path, capsys):
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    ckpt["model_args"]["latent_dim"] = 5                 # says latent 5, holds latent-3 weights
    torch.save(ckpt, tmp_path / "other.pt")
    code, _, err = main_in_process(capsys, "--eval", tmp_path / "other.pt", "--data-dir", tiny_mnist)
    assert code == 2 and "another architecture" in err and "enc_mu.weight (3, 32) vs (5, 32)" in err


def test_resume_refuses_a_changed_architecture_and_leaves_the_run_alone(trained_run, tiny_mnist, capsys):
    before = {p.name: p.read_bytes() for p in trained_run.iterdir()}
    code, _, err = main_in_process(capsys, "--resume", trained_run / "checkpoint.pt", "--arch", "conv",
                                   "--data-dir", tiny_mnist)
    assert code == 2 and "--arch conv differs from the resumed run's mlp" in err
    assert {p.name: p.read_bytes() for p in trained_run.iterdir()} == before


def test_best_pt_cannot_be_resumed_but_can_be_evaluated(trained_run, tiny_mnist, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in trained_run.iterdir()}
    code, _, err = main_in_process(capsys, "--resume", trained_run / "best.pt", "--data-dir", tiny_mnist)
    assert code == 2 and "resume from the run's checkpoint.pt" in err
    assert {p.name: p.read_bytes() for p in trained_run.iterdir()} == before
    code, _, _ = main_in_process(capsys, "--eval", trained_run / "best.pt", "--data-dir", tiny_mnist,
                                 "--out-dir", tmp_path / "eval", "--iw-samples", 5)
    assert code == 0
    corrupt = tiny_mnist / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    corrupt.write_bytes(b"\x00\x00\x08\x07" + corrupt.read_bytes()[4:])   # a wrong IDX magic number
    code, _, err = main_in_process(capsys, "--eval", trained_run / "best.pt", "--data-dir", tiny_mnist,
                                   "--out-dir", tmp_path / "eval2")
    assert code == 2 and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_with_an_unknown_config_field_still_evaluates(trained_run, tiny_mnist, tmp_path, capsys):
    ckpt = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["a_field_from_another_version"] = 1
    del ckpt["config"]["binarize"]                        # and one it lacks: today's default
    torch.save(ckpt, tmp_path / "other-version.pt")
    code, _, err = main_in_process(capsys, "--eval", tmp_path / "other-version.pt", "--data-dir", tiny_mnist,
                                   "--out-dir", tmp_path / "eval")
    assert code == 0, err


def test_eval_refuses_a_flag_that_would_change_the_models_protocol(trained_run, tiny_mnist, capsys):
    code, _, err = main_in_process(capsys, "--eval", trained_run / "checkpoint.pt", "--binarize", "dynamic",
                                   "--data-dir", tiny_mnist)
    assert code == 2 and "--binarize dynamic differs from the checkpoint's none" in err


@pytest.mark.parametrize("args,message", [
    (["--epochs", 1], "the checkpoint has already done 1 epochs"),          # nothing left to train
    (["--out-dir", "elsewhere"], "--out-dir elsewhere differs from the resumed run's"),  # a run stays put
])
def test_resume_refuses_what_it_cannot_honour_and_leaves_the_run_alone(trained_run, tiny_mnist, capsys,
                                                                      args, message):
    before = {p.name: p.read_bytes() for p in trained_run.iterdir()}
    code, _, err = main_in_process(capsys, "--resume", trained_run / "checkpoint.pt", *args, "--data-dir", tiny_mnist)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in trained_run.iterdir()} == before


# another process that holds the lock as main.writer_lock does (flock), without importing torch
HOLD_LOCK = ("import fcntl, os, socket, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
             "f.write(f'{os.getpid()}@{socket.gethostname()}'); f.flush(); print('held', flush=True); sys.stdin.read()")


def test_a_run_being_written_by_another_process_is_not_resumed_until_that_process_dies(trained_run, tiny_mnist,
                                                                                       capsys):
    pytest.importorskip("fcntl")
    lock = trained_run / "writer.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: p.read_bytes() for p in trained_run.iterdir()}
        code, _, err = main_in_process(capsys, "--resume", trained_run / "checkpoint.pt", "--epochs", 2,
                                       "--data-dir", tiny_mnist)
        assert code == 2 and "is being written by another process" in err and f"{holder.pid}@" in err, err
        assert len(err.strip().splitlines()) == 1
        assert {p.name: p.read_bytes() for p in trained_run.iterdir()} == before
    finally:
        holder.kill()                       # kill -9: no clean-up of its own, the file stays
        holder.wait()
    assert lock.exists()                    # but the kernel released the flock with the process
    main.main(["--resume", str(trained_run / "checkpoint.pt"), "--epochs", "2", "--data-dir", str(tiny_mnist)])
    assert torch.load(trained_run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not lock.exists()                # released at the end


@pytest.mark.parametrize("flock", [True, False])
def test_the_writer_lock_has_one_holder_at_a_time(tmp_path, monkeypatch, flock):
    if flock:
        pytest.importorskip("fcntl")
    else:                                   # Windows: the file's existence is the lock
        monkeypatch.setattr(runs, "fcntl", None)
    with runs.writer_lock(tmp_path):
        assert (tmp_path / "writer.lock").read_text() == f"{os.getpid()}@{socket.gethostname()}"
        with pytest.raises(runs.UsageError, match="being written by another process") as refusal:
            with runs.writer_lock(tmp_path):
                pass
        assert ("delete" in str(refusal.value)) != flock     # only a file lock needs a hand to delete it
    with runs.writer_lock(tmp_path):        # released: the next holder takes it
        pass
    assert not (tmp_path / "writer.lock").exists()


def test_resume_keeps_a_cosine_runs_length(tiny_mnist, tmp_path, capsys):
    train_tiny(tiny_mnist, tmp_path / "runs", "--epochs", 2, "--max-batches", 1, "--lr-schedule", "cosine")
    code, _, err = main_in_process(capsys, "--resume", only_run(tmp_path / "runs") / "checkpoint.pt",
                                   "--epochs", 4, "--data-dir", tiny_mnist)
    assert code == 2 and "cosine schedule of this run was laid out for 2 epochs" in err


def test_a_disk_error_mid_run_gets_one_line_and_exit_code_1(tiny_mnist, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "checkpoint.pt"))
    monkeypatch.setattr(runs, "save_checkpoint", disk_full)
    code, _, err = main_in_process(capsys, *TINY, "--epochs", 1, "--data-dir", tiny_mnist, "--out-dir", tmp_path)
    last = err.strip().splitlines()[-1]                   # after the progress bar
    assert code == 1 and last.startswith("error: cannot read or write") and "Traceback" not in err
    assert "No space left on device" in last and "checkpoint.pt" in last


def test_an_unreadable_cached_classifier_is_retrained(tiny_mnist, capsys):
    (tiny_mnist / "classifier.pt").write_bytes(b"not a checkpoint")
    net, accuracy = judge.load_classifier(tiny_mnist, torch.device("cpu"), seed=1)
    assert "cannot use" in capsys.readouterr().out and 0 <= accuracy <= 1
    assert torch.load(tiny_mnist / "classifier.pt", weights_only=True)["test_accuracy"] == accuracy


def test_the_seeds_accepted_are_the_ones_torch_takes():
    """The ends of --seed's range are torch.manual_seed's, found by asking torch: 0 and 2**64 − 1 are
    taken by both, 2**64 by neither (main.py's one-line refusals of 2**64 and of -1, which torch
    would alias to 2**64 − 1, are tested with the other bad input above)."""
    with torch.random.fork_rng(devices=[]):
        for seed in (0, 2 ** 64 - 1):
            torch.manual_seed(seed)
            main.check_config(main.Config(seed=seed))
        with pytest.raises(ValueError):
            torch.manual_seed(2 ** 64)


def test_out_of_memory_gets_one_line_that_suggests_a_smaller_batch(tiny_mnist, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total)")
    monkeypatch.setattr(main, "train_epoch", out_of_memory)
    code, _, err = main_in_process(capsys, *TINY, "--epochs", 1, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: out of memory") and "smaller --batch-size" in err and "Tried to allocate" in err
    assert not (only_run(tmp_path / "out") / "writer.lock").exists()


def test_eval_records_the_settings_it_used_not_the_checkpoints(trained_run, tiny_mnist, tmp_path, capsys):
    code, _, err = main_in_process(capsys, "--eval", trained_run / "checkpoint.pt", "--seed", 7, "--max-batches", 1,
                                   "--data-dir", tiny_mnist, "--out-dir", tmp_path / "eval")
    assert code == 0, err
    metrics = json.loads((only_run(tmp_path / "eval") / "metrics.json").read_text())
    assert metrics["config"]["seed"] == 7 and metrics["config"]["max_batches"] == 1       # a partial evaluation
    assert metrics["trained_config"]["seed"] == 1 and "max_batches" not in metrics["trained_config"]


def test_resuming_a_finished_run_keeps_its_final_report(trained_run, tiny_mnist, capsys):
    first = json.loads((trained_run / "metrics.json").read_text())["final"]
    with interrupted_in_epoch(3):
        code, _, err = main_in_process(capsys, "--resume", trained_run / "checkpoint.pt", "--epochs", 3,
                                       "--data-dir", tiny_mnist, "--iw-samples", 5)
    assert code == 130, err
    # the command it prints repeats the settings --resume takes from its command line, not the
    # checkpoint, and the --epochs this resume was given
    assert err.strip().endswith(f"continue with: python main.py --resume {trained_run / 'checkpoint.pt'} "
                                f"--data-dir {tiny_mnist} --iw-samples 5 --epochs 3"), err
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert "final" not in metrics                                # the resumed run has not finished
    assert metrics["earlier_finals"] == [{**first, "run_epochs": 1}]     # but the finished one's report stays
    main.main(["--resume", str(trained_run / "checkpoint.pt"), "--epochs", "3", "--data-dir", str(tiny_mnist),
               "--iw-samples", "5"])
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["final"]["iw_samples"] == 5 and metrics["earlier_finals"] == [{**first, "run_epochs": 1}]


def test_the_default_data_dir_is_the_projects_from_any_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                                  # not the project folder
    code, _, err = main_in_process(capsys, "--model", "vae", "--epochs", 1, "--max-batches", 1, "--iw-samples", 0,
                                   "--out-dir", tmp_path / "out")
    assert code == 0, err
    assert not (tmp_path / "data").exists()                      # no download into the working directory
    metrics = json.loads((only_run(tmp_path / "out") / "metrics.json").read_text())
    assert metrics["config"]["data_dir"] == "data"       # as given: a moved run folder still finds its data
    # the default names the project's data/; any other relative path is read from the working directory
    assert data.data_path("data") == ROOT / "data"
    assert data.data_path("elsewhere/data") == Path("elsewhere/data")


def test_a_conv_run_from_before_the_channels_flag_resumes(tiny_mnist, tmp_path):
    """Such a checkpoint stores neither conv_channels nor a hidden_dim other than 0 (which then meant
    256): --resume must continue the 32-64 model it holds, not build today's default conv model."""
    train_tiny(tiny_mnist, tmp_path / "out", "--arch", "conv", "--conv-channels", "32,64", "--hidden-dim", 256,
               "--epochs", 1)
    path = only_run(tmp_path / "out") / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model_args"]["conv_channels"], ckpt["config"]["conv_channels"]
    ckpt["config"]["hidden_dim"] = 0
    torch.save(ckpt, path)
    main.main(["--resume", str(path), "--epochs", "2", "--data-dir", str(tiny_mnist)])
    resumed = torch.load(path, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["model_args"]["conv_channels"] == [32, 64]
    assert resumed["config"]["conv_channels"] == "32,64" and resumed["config"]["hidden_dim"] == 256


def test_read_json_gives_an_empty_object_for_anything_but_a_json_object(tmp_path):
    # write_metrics and anomaly.summarize read metrics.json through it and expect a dict
    for text, expected in (('{"a": 1}', {"a": 1}), ("[1, 2]", {}), ("3", {}), ("not json", {})):
        (tmp_path / "m.json").write_text(text)
        assert runs.read_json(tmp_path / "m.json") == expected
    assert runs.read_json(tmp_path / "missing.json") == {}


def test_a_benchmarks_json_path_is_checked_before_the_work(tmp_path, capsys):
    """--json of a benchmark: its folder is made at the start; a folder, or a path under a file,
    stops the script there in one line with exit code 2, not after minutes of timing."""
    assert runs.json_target(tmp_path / "new" / "run.json") == tmp_path / "new" / "run.json"
    assert (tmp_path / "new").is_dir() and runs.json_target(None) is None
    (tmp_path / "a-file").write_text("")
    for bad, says in ((tmp_path / "new", "is a folder"), (tmp_path / "a-file" / "run.json", "cannot make its folder")):
        with pytest.raises(SystemExit) as stop:
            runs.json_target(bad)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and says in err and err.count("\n") == 1


def test_eval_of_a_smoke_run_reads_the_whole_test_set_with_the_default_k(tiny_mnist, tmp_path, capsys, monkeypatch):
    """A run trained with --max-batches 1 --iw-samples 0: a plain --eval of it prints an NLL with
    --help's K and scores all 48 test images (3 evaluation batches of 16 here), not the trained
    run's 1 batch and K = 0; the same --eval with --max-batches 1 scores the first batch only."""
    monkeypatch.setattr(data, "EVAL_BATCH_SIZE", 16)
    with no_pictures():
        train_tiny(tiny_mnist, tmp_path / "runs", "--epochs", 1, "--max-batches", 1, "--iw-samples", 0)
    run = only_run(tmp_path / "runs")
    with no_pictures():
        code, out, err = main_in_process(capsys, "--eval", run / "checkpoint.pt", "--data-dir", tiny_mnist,
                                         "--out-dir", tmp_path / "whole")
        assert code == 0, err
        code, _, err = main_in_process(capsys, "--eval", run / "checkpoint.pt", "--data-dir", tiny_mnist,
                                       "--max-batches", 1, "--out-dir", tmp_path / "part")
        assert code == 0, err
    whole = json.loads((only_run(tmp_path / "whole") / "metrics.json").read_text())
    part = json.loads((only_run(tmp_path / "part") / "metrics.json").read_text())
    assert whole["config"]["max_batches"] == 0 and whole["eval"]["iw_samples"] == main.Config().iw_samples == 100
    assert "NLL" in out and whole["eval"]["test_nll"] > 0
    assert whole["trained_config"].get("max_batches") is None              # the smoke run's setting was not kept
    assert part["config"]["max_batches"] == 1 and part["eval"]["test_neg_elbo"] != whole["eval"]["test_neg_elbo"]
