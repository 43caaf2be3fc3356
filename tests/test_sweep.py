"""sweep.py: seeds run by the local launcher (main.py in subprocesses; the Slurm launcher on a real
Slurm is tests/test_slurm.py's); finished seeds skipped, stopped ones resumed, failures reported,
bad input refused before anything is written, and the summary's mean ± std. Where a process is not
the point, the runs are main.main in this process, without pictures, to keep the tests fast."""
import contextlib
import hashlib
import json
import shlex
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY_SWEEP, finished_runs, interrupted_in_epoch, sweep_in_process, tiny_sweep_args

import main
import runs
import sweep
import viz

@pytest.fixture
def in_process_runs(monkeypatch):
    """Each seed's main.py command run as main.main in this process (one at a time), its output
    appended to the seed's log as the subprocess's would be, and no pictures drawn."""
    monkeypatch.setattr(viz, "draw_run", lambda *args, **kwargs: None)
    commands = []

    def run_seed(command, log, cwd, threads):
        assert command[:2] == [sys.executable, str(sweep.MAIN)]
        commands.append(command[2:])
        with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                main.main(command[2:])
            except SystemExit as exit:
                return exit.code
        return 0
    monkeypatch.setattr(sweep, "run_seed", run_seed)
    return commands


def test_the_local_launcher_runs_each_seed_and_reports_a_failed_one(tiny_mnist, tmp_path, capsys):
    """main.py in worker subprocesses; seed 2's folder is a file, so its run fails (exit code 2): the
    sweep names its log, keeps seed 1, summarises it and exits with 1."""
    args = tiny_sweep_args(tiny_mnist)
    folder = sweep.sweep_dir(tmp_path, args)
    assert folder == tmp_path / f"sweep-main-{hashlib.sha1(' '.join(args).encode()).hexdigest()[:8]}"
    folder.mkdir(parents=True)
    (folder / "seed2").write_text("in the way")
    code, out, err = sweep_in_process(capsys, *args, "--seeds", "1,2", "--workers", "2", "--out-dir", tmp_path)
    assert code == 1, err
    assert "running 2 seeds here, 2 at once, 1 threads each" in out
    assert f"seed 2: failed (exit code 2), see {folder / 'seed2.log'}" in out
    assert "seed 1: finished" in out and "1/2 done, 1 failed" in out
    assert "cannot create a run folder" in (folder / "seed2.log").read_text()
    state, run = sweep.seed_state(folder / "seed1")
    assert state == "finished" and run.name.startswith("vae-mlp-seed1-")
    log = (folder / "seed1.log").read_text()
    assert log.startswith(f"$ {sys.executable} {sweep.MAIN} ") and f"--seed 1 --out-dir {folder / 'seed1'}" in log
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["runs"] == [str(run)] and summary["metrics"]["test_nll"]["n"] == 1
    assert summary["metrics"]["test_nll"]["std"] is None


def test_a_rerun_skips_finished_seeds_and_the_summary_is_mean_and_sample_std(tiny_mnist, tmp_path, capsys,
                                                                             in_process_runs):
    args = ["@" + str(ROOT / "configs" / "d-mlp-vae.args"), *tiny_sweep_args(tiny_mnist), "--seeds", "1,2,3",
            "--workers", "1", "--out-dir", tmp_path / "sweeps"]
    code, out, err = sweep_in_process(capsys, *args)
    assert code == 0, err
    assert len(in_process_runs) == 3 and in_process_runs[0][0] == "@" + str(ROOT / "configs" / "d-mlp-vae.args")
    folder = next((tmp_path / "sweeps").iterdir())
    assert folder.name.startswith("sweep-d-mlp-vae-")
    runs_before = finished_runs(folder, (1, 2, 3))
    summary = json.loads((folder / "summary.json").read_text())
    finals = [json.loads((r / "metrics.json").read_text())["final"] for r in runs_before]
    for name in ("test_neg_elbo", "test_nll", "test_kl", "active_units"):
        values = [f[name] for f in finals]
        assert summary["metrics"][name]["values"] == values and summary["metrics"][name]["n"] == 3
        assert summary["metrics"][name]["mean"] == pytest.approx(np.mean(values))
        assert summary["metrics"][name]["std"] == pytest.approx(np.std(values, ddof=1))
        assert summary["metrics"][name]["runs"] == [str(r) for r in runs_before]
    assert "kl_per_dim" not in summary["metrics"]                        # a list per dimension: no metric
    assert any(line.split()[:1] == ["test_nll"] for line in out.splitlines())      # the table
    # the same command again: nothing runs, no folder is added, the summary is the same
    code, out, err = sweep_in_process(capsys, *args)
    assert code == 0 and len(in_process_runs) == 3
    assert [line for line in out.splitlines() if "finished already" in line] == [
        f"seed {s}: finished already ({r})" for s, r in zip((1, 2, 3), runs_before)]
    assert [sorted(p.name for p in (folder / f"seed{s}").iterdir()) for s in (1, 2, 3)] == [[r.name] for r in runs_before]
    assert json.loads((folder / "summary.json").read_text())["metrics"] == summary["metrics"]
    # python sweep.py --summarize RUN...: the same numbers from the run folders
    code, out, _ = sweep_in_process(capsys, "--summarize", *runs_before)
    assert code == 0 and f"{summary['metrics']['test_nll']['mean']:.6g}" in out
    # ... --records DIR: each run's metrics.json made small, named by its seed, and the same summary
    code, out, err = sweep_in_process(capsys, "--summarize", *runs_before, "--records", tmp_path / "records")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["seed1.json", "seed2.json", "seed3.json",
                                                                        "summary.json"]
    shipped = json.loads((tmp_path / "records" / "summary.json").read_text())
    assert shipped["runs"] == ["seed1.json", "seed2.json", "seed3.json"]
    for name, s in summary["metrics"].items():
        assert {**s, "runs": None} == {**shipped["metrics"][name], "runs": None}
    for seed, run, final in zip((1, 2, 3), runs_before, finals):
        rec = json.loads((tmp_path / "records" / f"seed{seed}.json").read_text())
        whole = json.loads((run / "metrics.json").read_text())
        assert rec["final"] == final and rec["provenance"] == whole["provenance"] and rec["config"]["seed"] == seed
        assert [r["epoch"] for r in rec["epochs"]] == [r["epoch"] for r in whole["epochs"]]
        assert rec["epochs"][-1] == {k: round(whole["epochs"][-1][k], 3) for k in runs.EPOCH_FIELDS}
    code, _, err = sweep_in_process(capsys, "--summarize", runs_before[0], runs_before[0], "--records", tmp_path / "r2")
    assert code == 2 and "two of these runs have the same seed" in err and not (tmp_path / "r2").exists()
    # a record stands in for a run folder that is gone: the same records and summary
    code, _, err = sweep_in_process(capsys, "--summarize", tmp_path / "records" / "seed1.json", *runs_before[1:],
                                    "--records", tmp_path / "r3")
    assert code == 0, err
    assert all((tmp_path / "r3" / name).read_bytes() == (tmp_path / "records" / name).read_bytes()
               for name in ("seed1.json", "seed2.json", "seed3.json", "summary.json"))


@contextlib.contextmanager
def interrupted_in_the_final_report():
    def final_report(*args, **kwargs):
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main, "final_report", final_report)
        yield


@pytest.mark.parametrize("stopped", ["in epoch 2", "in the final report"])
def test_a_stopped_seed_resumes_from_its_checkpoint_as_if_never_stopped(tiny_mnist, tmp_path, capsys, in_process_runs,
                                                                        stopped):
    """Seed 1 stopped as by kill (SIGTERM -> KeyboardInterrupt) in its epoch 2 of 2, or after both
    epochs in the final report: the run keeps its last epoch's checkpoint.pt and has no final
    report, the sweep fails it; the same command then resumes it in its folder and ends where an
    uninterrupted run ends."""
    args = [*tiny_sweep_args(tiny_mnist, "--epochs", 2), "--seeds", "1", "--out-dir", tmp_path / "sweeps"]
    with interrupted_in_epoch(2) if stopped == "in epoch 2" else interrupted_in_the_final_report():
        code, out, _ = sweep_in_process(capsys, *args)
    folder = next((tmp_path / "sweeps").iterdir())
    assert code == 1 and f"seed 1: failed (exit code 130), see {folder / 'seed1.log'}" in out
    state, run = sweep.seed_state(folder / "seed1")
    assert state == "resume" and not (folder / "summary.json").exists()
    code, out, err = sweep_in_process(capsys, *args)
    assert code == 0, err
    assert f"seed 1: resuming {run / 'checkpoint.pt'}" in out
    assert in_process_runs[-1] == ["--resume", str(run / "checkpoint.pt"),
                                   *tiny_sweep_args(tiny_mnist, "--epochs", 2), "--seed", "1"]
    assert list((folder / "seed1").iterdir()) == [run] and sweep.seed_state(folder / "seed1") == ("finished", run)
    resumed = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in resumed["epochs"]] == [1, 2]
    main.main([*tiny_sweep_args(tiny_mnist, "--epochs", 2), "--out-dir", str(tmp_path / "whole")])
    whole = json.loads((next((tmp_path / "whole").iterdir()) / "metrics.json").read_text())
    assert resumed["final"] == whole["final"]


@pytest.mark.parametrize("args, message", [
    (["@configs/no-such-recipe.args"], "No such file or directory: 'configs/no-such-recipe.args'"),
    (["--seeds", ""], "--seeds '': give distinct integer seeds"),
    (["--seeds"], "argument --seeds: expected one argument"),
    (["--seeds", "1,x"], "--seeds '1,x': give distinct integer seeds"),
    (["--seeds", "2,2"], "--seeds '2,2': give distinct integer seeds"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--no-such-flag", "3"], "unrecognized arguments: --no-such-flag 3"),
    (["--seeds", "1,-3"], "--seed must be from 0 to 2**64 - 1"),
    (["--seed", "3"], "--seed is set by the sweep for every run"),
    (["--eval", "checkpoints/vae-mlp-binarized.pt"], "--eval: a sweep trains models, one per seed"),
    (["--model", "both"], "a sweep's run trains one model: give --model vae or --model cvae"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--summarize"], "argument --summarize: expected at least one argument"),
])
def test_bad_input_gets_one_line_and_exit_code_2_before_anything_is_written(tmp_path, capsys, monkeypatch, args,
                                                                            message, in_process_runs):
    monkeypatch.chdir(ROOT)
    defaults = {"--seeds": "1,2"} if "--seeds" not in args else {}
    argv = [*TINY_SWEEP, *args, *[x for kv in defaults.items() for x in kv], "--out-dir", tmp_path / "out"]
    code, out, err = sweep_in_process(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists() and in_process_runs == []


def test_a_sweep_needs_seeds(tmp_path, capsys):
    code, _, err = sweep_in_process(capsys, *TINY_SWEEP, "--out-dir", tmp_path / "o")
    assert code == 2 and err.strip() == "error: give the seeds to run: --seeds 1,2,3"
    assert not (tmp_path / "o").exists()


def test_slurm_is_refused_without_sbatch(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep.shutil, "which", lambda name: None)
    code, _, err = sweep_in_process(capsys, *TINY_SWEEP, "--seeds", "1", "--launcher", "slurm",
                                    "--out-dir", tmp_path / "o")
    assert code == 2 and "--launcher slurm needs Slurm's sbatch on the PATH" in err
    assert not (tmp_path / "o").exists()


def test_summarize_refuses_a_folder_without_a_final_report(tmp_path, capsys):
    code, _, err = sweep_in_process(capsys, "--summarize", tmp_path)
    assert code == 2 and err.strip() == f"error: {tmp_path}: {runs.NO_REPORT}"


def test_the_summary_of_one_class_and_eval_records():
    """runs.end_metrics reads a --one-class record's AUROCs and an --eval record's report."""
    one_class = {"mean_auroc": {"neg_elbo": 0.9}, "per_digit": {"3": {"auroc": {"neg_elbo": 0.8}, "train_images": 7}}}
    assert runs.scalars({"mean_auroc": one_class["mean_auroc"], "per_digit": {"3": {"auroc": {"neg_elbo": 0.8}}}}) == {
        "mean_auroc.neg_elbo": 0.9, "per_digit.3.auroc.neg_elbo": 0.8}
    table = runs.summarize([{"a": 1.0, "b": 2}, {"a": 4.0}], ["r1", "r2"])
    assert table["a"] == {"mean": 2.5, "std": pytest.approx(np.std([1, 4], ddof=1)), "n": 2, "values": [1.0, 4.0],
                          "runs": ["r1", "r2"]}
    assert table["b"] == {"mean": 2, "std": None, "n": 1, "values": [2], "runs": ["r1"]}
    # a report's settings and the published numbers it quotes are not its results
    impute = {"provenance": {}, "config": {"seed": 1}, "iw_samples": 1000, "n_chains": 20, "neg_log_px": 86.3,
              "neg_cond_log_lik": {"1_quadrants": 60.2}, "pyro_cvae": {"1": 71.8}}
    assert runs.end_metrics_of(impute) == {"neg_log_px": 86.3, "neg_cond_log_lik.1_quadrants": 60.2}
    assert runs.end_metrics_of({"final": {"epoch": 3, "iw_samples": 5000, "test_nll": 86.4}}) == {"epoch": 3,
                                                                                                  "test_nll": 86.4}


def test_the_machines_table_passes_over_a_summary_and_refuses_what_is_no_record(tmp_path, capsys):
    """--records-table: a record's row shows the threads of every process of a resumed run; a file
    that is not a record gets one line and exit code 2."""
    prov = {"device_name": "Some CPU", "threads": 1, "torch": "2.x", "commit": "a" * 40, "wall_seconds": 60.0,
            "started_utc": "2026-12-05T10:00:00+00:00", "load_average": [1.5, 1.0, 0.5]}
    (tmp_path / "seed1.json").write_text(json.dumps({"provenance": prov, "earlier_provenance": [
        {**prov, "threads": 2, "wall_seconds": 30.0}]}))
    (tmp_path / "summary.json").write_text(json.dumps({"runs": ["seed1.json"], "metrics": {}}))
    (tmp_path / "other.json").write_text(json.dumps({"final": {"test_nll": 1.0}}))
    table = sweep.records_table(["seed1.json", "summary.json"], root=tmp_path)
    assert table.splitlines()[2:] == ["| `seed1.json` | Some CPU | 1, 2 | 1.5 | 2.x | aaaaaaa | 2026-12-05 10:00 | "
                                      "90 s in 2 processes (resumed) |"]
    for bad, message in (("other.json", "not a record with its provenance"), ("gone.json", "no such file")):
        code, _, err = sweep_in_process(capsys, "--records-table", tmp_path / bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_documents_sweep_commands_pass_the_sweeps_checks(monkeypatch):
    """Every `python sweep.py ...` that runs seeds in README.md and docs/ passes what the sweep checks
    before it writes anything (main.py's checks included); no run is started."""
    import test_docs
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sweep.shutil, "which", lambda name: "/usr/bin/" + name)     # Slurm or not
    found = [test_docs.fill_placeholders(c) for doc in test_docs.DOCS for c in test_docs.commands(doc)
             if c.startswith("python sweep.py") and "--summarize" not in c and "--records-table" not in c]
    assert len(found) >= 3
    for command in found:
        opts, main_args = sweep.make_parser().parse_known_args(shlex.split(command)[2:])
        sweep.check_sweep(opts, main_args, sweep.parse_seeds(opts.seeds))
