"""One main.py command over several seeds: in parallel on this machine, or as one Slurm job array
submitted through submitit; then the mean ± standard deviation of every result the runs report.

    python sweep.py @configs/binarized-vae.args --val-size 10000 --seeds 1,2,3 --out-dir sweeps
    python sweep.py @configs/binarized-vae.args --seeds 1,2,3 --launcher slurm --partition gpu \\
        --gpus-per-task 1 --time-min 240 --out-dir sweeps
    python sweep.py --summarize results/vae-mlp-seed*/        # the same summary of existing runs
    python sweep.py --summarize results/vae-mlp-seed*/ --records records/NAME   # ... shipped as data

Every flag that is not the sweep's own goes to main.py as it is, the @recipe included. The sweep
writes DIR/sweep-<recipe>[-<hash of the other main.py flags>]/: seed<S>/ (main.py's run folder of
seed S), seed<S>.log, slurm/ (submitit's files) and summary.json. Run again, the same command skips
the seeds that finished and resumes the others from their checkpoint.pt. docs/cluster.md has it all.
"""
import argparse
import concurrent.futures
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import main
import runs
from runs import UsageError

MAIN = Path(__file__).resolve().parent / "main.py"


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False,         # --seed is main.py's, not short for --seeds
                                     usage="python sweep.py [@RECIPE] [MAIN.PY FLAGS...] --seeds S,S,... "
                                           "[--launcher local|slurm] [--out-dir DIR] [...]\n"
                                           "       python sweep.py --summarize RUN_DIR...")
    parser.add_argument("--seeds", help="the seeds, one run each: 1,2,3")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: worker processes on this machine; slurm: one job array (default: local)")
    parser.add_argument("--out-dir", default="results", help="the sweep's folder goes in here (default: results)")
    parser.add_argument("--workers", type=int, help="runs at once (default: local, the number of cores; "
                                                    "slurm, all of them)")
    parser.add_argument("--partition", default="", help="slurm: the partition (default: the cluster's default)")
    parser.add_argument("--time-min", type=int, default=24 * 60, help="slurm: each run's time limit in minutes "
                                                                      "(default: 1440)")
    parser.add_argument("--cpus-per-task", type=int, default=1, help="slurm: cores per run, and its threads "
                                                                     "(default: 1)")
    parser.add_argument("--gpus-per-task", type=int, default=0, help="slurm: GPUs per run (default: 0)")
    parser.add_argument("--summarize", nargs="+", metavar="RUN_DIR", help="summarise these run folders (or "
                                                                          "records: metrics.json files); run nothing")
    parser.add_argument("--records-table", nargs="+", metavar="RECORD", help="print the machines behind these "
                                                                              "records as a markdown table; run nothing")
    parser.add_argument("--records", metavar="DIR", help="with --summarize: write each run's metrics.json, "
                                                         "made small (runs.record), as DIR/seed<S>.json and "
                                                         "the summary as DIR/summary.json")
    parser.error = lambda message: runs.fail(f"{message} (see python sweep.py --help)")
    return parser


# ------------------------------------------------------------------------------------------------
# Checking the command: every run's flags pass main.py's own checks before anything is written
# ------------------------------------------------------------------------------------------------
def parse_seeds(text):
    if text is None:
        raise UsageError("give the seeds to run: --seeds 1,2,3")
    try:
        seeds = [int(s) for s in (text or "").split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: give distinct integer seeds separated by commas, e.g. --seeds 1,2,3")
    return seeds


def check_sweep(opts, main_args, seeds):
    """A UsageError for a sweep that main.py or the launcher would refuse; else nothing."""
    for name in ("workers", "time_min", "cpus_per_task"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise UsageError(f"{runs.flag(name)} must be at least 1, got {getattr(opts, name)}")
    if opts.gpus_per_task < 0:
        raise UsageError(f"--gpus-per-task must be 0 or more, got {opts.gpus_per_task}")
    if opts.launcher == "slurm" and not shutil.which("sbatch"):
        raise UsageError("--launcher slurm needs Slurm's sbatch on the PATH (none here): use --launcher local, "
                         "or run the sweep on a machine of the cluster")
    cfg, mode, given = main.parse_args(main_args)
    if name := main.check_mode(cfg, mode, given):
        raise UsageError(f"{runs.flag(name)}: a sweep trains models, one per seed; run other modes with main.py")
    for name in sorted({"seed", "out_dir"} & given):
        raise UsageError(f"{runs.flag(name)} is set by the sweep for every run (--seeds, --out-dir): drop it from "
                         f"main.py's flags")
    if cfg.model == "both":
        raise UsageError("a sweep's run trains one model: give --model vae or --model cvae (and sweep the "
                         "other with a second command)")
    for seed in seeds:
        cfg, mode, given = main.parse_args([*main_args, "--seed", str(seed)])
        main.check_config(cfg)


def sweep_dir(out_dir, main_args):
    """DIR/sweep-<stem of the @recipe, or main>, with -<8 hex digits of sha1 of the other flags> when
    there are any: the same command always finds its own folder, another one never does."""
    recipe = next((a for a in main_args if a.startswith("@")), None)
    extra = [a for a in main_args if a is not recipe]
    name = "sweep-" + (Path(recipe[1:]).stem if recipe else "main")
    if extra:
        name += "-" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8]
    return Path(out_dir) / name


# ------------------------------------------------------------------------------------------------
# Each seed: finished (skip), stopped with a checkpoint (resume), or new
# ------------------------------------------------------------------------------------------------
def seed_state(seed_dir):
    """('finished', run folder) if a run in seed_dir has its final report, else ('resume', the run
    whose checkpoint.pt was written last), else ('new', None)."""
    folders = [p for p in seed_dir.iterdir() if p.is_dir()] if seed_dir.is_dir() else []
    finished = [p for p in folders if "final" in runs.read_json(p / "metrics.json")]
    if finished:
        return "finished", max(finished, key=lambda p: (p / "metrics.json").stat().st_mtime)
    stopped = [p for p in folders if (p / "checkpoint.pt").is_file()]
    if stopped:
        return "resume", max(stopped, key=lambda p: (p / "checkpoint.pt").stat().st_mtime)
    return "new", None


def seed_command(main_args, seed, seed_dir, state, run):
    """The main.py command line that runs (or resumes) the seed's run."""
    if state == "resume":
        return [sys.executable, str(MAIN), "--resume", str(run / "checkpoint.pt"), *main_args, "--seed", str(seed)]
    return [sys.executable, str(MAIN), *main_args, "--seed", str(seed), "--out-dir", str(seed_dir)]


def run_seed(command, log, cwd, threads):
    """Run one seed's command with its output appended to log; its exit code. The one function both
    launchers call: on Slurm it runs inside the job, whose SLURM_* variables main.py inherits."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env).returncode


# ------------------------------------------------------------------------------------------------
# The launchers: each runs the seeds' commands, reports each end, returns the seeds that failed
# ------------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, n):
        self.n, self.done, self.failed = n, 0, []

    def report(self, seed, code, log, why=""):
        if code == 0:
            self.done += 1
            print(f"seed {seed}: finished")
        else:
            self.failed.append(seed)
            print(f"seed {seed}: failed ({why or f'exit code {code}'}), see {log}")
        print(f"{self.done}/{self.n} done, {len(self.failed)} failed", flush=True)


def launch_local(tasks, workers, cwd):
    """A pool of `workers` runs at once, the machine's cores split evenly between them."""
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    threads = max(1, (os.cpu_count() or 1) // workers)
    print(f"running {len(tasks)} seeds here, {workers} at once, {threads} threads each", flush=True)
    progress = Progress(len(tasks))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_seed, command, log, cwd, threads): (seed, log) for seed, command, log in tasks}
        for future in concurrent.futures.as_completed(futures):
            seed, log = futures[future]
            progress.report(seed, future.result(), log)
    return progress.failed


def launch_slurm(tasks, opts, folder, cwd):
    """One Slurm job array through submitit, a task per seed, each with opts.cpus_per_task threads."""
    import submitit         # here: a local sweep does not need it
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=opts.time_min, cpus_per_task=opts.cpus_per_task,
                               slurm_array_parallelism=opts.workers or len(tasks),
                               **({"slurm_partition": opts.partition} if opts.partition else {}),
                               **({"gpus_per_node": opts.gpus_per_task} if opts.gpus_per_task else {}))
    seeds, commands, logs = zip(*tasks)
    jobs = executor.map_array(run_seed, commands, logs, [cwd] * len(tasks), [opts.cpus_per_task] * len(tasks))
    print(f"submitted Slurm job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} seeds; submitit's files in "
          f"{folder}", flush=True)
    progress = Progress(len(tasks))
    task_of = {job.job_id: (seed, log) for job, seed, log in zip(jobs, seeds, logs)}
    for job in submitit.helpers.as_completed(jobs, poll_frequency=1):
        seed, log = task_of[job.job_id]
        try:
            progress.report(seed, job.result(), log)
        except Exception as err:            # the job died without a result: Slurm's time limit, a lost node
            why = f"Slurm job {job.job_id}: {str(err).splitlines()[0][:200]}; {job.paths.stderr}"
            progress.report(seed, None, log, why)
    return progress.failed


# ------------------------------------------------------------------------------------------------
# The summary: mean, sample standard deviation, n, values and run folders of every final number
# ------------------------------------------------------------------------------------------------
def summary(run_dirs):
    return runs.summarize([runs.end_metrics(r) for r in run_dirs], run_dirs)


def write_records(run_dirs, folder):
    """The records of a published number: each run's metrics.json made small, named by its seed,
    and the summary over them, its runs named by those files (each record keeps its own command
    line and out_dir, as it ran)."""
    folder = Path(folder)
    records = [runs.record(runs.read_json(runs.metrics_path(r))) for r in run_dirs]
    ends = [runs.end_metrics_of(rec, r) for rec, r in zip(records, run_dirs)]   # no report: refused, nothing written
    names = [f"seed{r['config']['seed']}.json" if "config" in r else "run.json" for r in records]
    if len(set(names)) < len(names):
        raise UsageError(f"--records: two of these runs have the same seed ({', '.join(names)}); "
                         "summarise one model's runs at a time")
    folder.mkdir(parents=True, exist_ok=True)
    for rec, name in zip(records, names):
        runs.save_json(rec, folder / name)
    table = runs.summarize(ends, names)
    runs.save_json({"runs": names, "metrics": table}, folder / "summary.json")
    return table


def records_table(paths, root="."):
    """A markdown table of the machines behind records (paths relative to root, one row per run
    record): CPU, threads, load, torch, commit, start and wall time (over all the processes of a
    resumed run), read from each record's provenance; a resumed run shows its last process's, and
    the thread counts of all its processes. A summary.json among the paths is passed over; a file
    that is neither a summary nor a record with its provenance is refused in one line."""
    lines = ["| record | device | threads | load at end | torch | commit | last started (UTC) | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(Path(p) for p in paths):
        if not (Path(root) / path).is_file():
            raise UsageError(f"{path}: no such file; give the records' metrics.json files: records/*/*.json")
        record = runs.read_json(Path(root) / path)
        if {"runs", "metrics"} <= set(record) and "provenance" not in record:
            continue
        try:
            p = record["provenance"]
            seconds, processes = runs.run_seconds(record)
            threads = sorted({q["threads"] for q in [p, *record.get("earlier_provenance", [])]})
            cpu = p.get("cpu") or {}
            device = p["device_name"] + (f" (family {cpu['cpu family']}, model {cpu['model']}; "
                                         f"{', '.join(cpu['features'])})" if cpu.get("cpu family") else "")
            load = "" if not p.get("load_average") else f"{p['load_average'][0]:.1f}"
            lines.append(f"| `{path.as_posix()}` | {device} | {', '.join(map(str, threads))} | {load} | {p['torch']} | "
                         f"{p['commit'][:7]} | {p['started_utc'][:16].replace('T', ' ')} | {minutes(seconds)}"
                         + (f" in {processes} processes (resumed)" if processes > 1 else "") + " |")
        except (KeyError, TypeError, IndexError) as err:
            raise UsageError(f"{path}: not a record with its provenance (no {err}); records are written by "
                             "python sweep.py --summarize RUN... --records DIR") from None
    return "\n".join(lines)


def minutes(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def print_table(table):
    width = max(map(len, table), default=6)
    print(f"{'metric':<{width}}  {'mean':>12}  {'std':>10}  {'n':>3}  values")
    for name, s in table.items():
        std = "" if s["std"] is None else f"{s['std']:.4g}"
        print(f"{name:<{width}}  {s['mean']:>12.6g}  {std:>10}  {s['n']:>3}  "
              + ", ".join(f"{v:.6g}" for v in s["values"]))


def sweep(opts, main_args):
    """Run the seeds that need it, then summarise all the finished ones; the exit code."""
    seeds = parse_seeds(opts.seeds)
    check_sweep(opts, main_args, seeds)
    folder = sweep_dir(opts.out_dir, main_args)
    folder.mkdir(parents=True, exist_ok=True)
    with runs.writer_lock(folder):                 # a second sweep of the same command is refused
        tasks = []
        for seed in seeds:
            state, run = seed_state(folder / f"seed{seed}")
            if state == "finished":
                print(f"seed {seed}: finished already ({run})")
                continue
            if state == "resume":
                print(f"seed {seed}: resuming {run / 'checkpoint.pt'}")
            tasks.append((seed, seed_command(main_args, seed, folder / f"seed{seed}", state, run),
                          folder / f"seed{seed}.log"))
        failed = []
        if tasks and opts.launcher == "local":
            failed = launch_local(tasks, opts.workers, os.getcwd())
        elif tasks:
            failed = launch_slurm(tasks, opts, folder / "slurm", os.getcwd())
        states = [seed_state(folder / f"seed{seed}") for seed in seeds]
        finished = [run for state, run in states if state == "finished"]
        if finished:
            table = summary(finished)
            runs.save_json({"command": ["sweep.py", *main_args, "--seeds", opts.seeds], "seeds": seeds,
                            "runs": [str(r) for r in finished], "metrics": table}, folder / "summary.json")
            print(f"\n{len(finished)} of {len(seeds)} seeds finished; {folder / 'summary.json'}:")
            print_table(table)
    if failed:
        print(f"{len(failed)} seeds failed ({', '.join(map(str, failed))}); the same command resumes them")
    return 1 if failed else 0


def cli(argv=None):
    opts, main_args = make_parser().parse_known_args(argv)
    with runs.one_line_errors():
        if opts.records_table:
            print(records_table(opts.records_table))
            return 0
        if opts.summarize:
            if main_args or opts.seeds:
                raise UsageError("--summarize takes run folders or records only: "
                                 "python sweep.py --summarize RUN_DIR...")
            print_table(write_records(opts.summarize, opts.records) if opts.records else summary(opts.summarize))
            return 0
        if opts.records:
            raise UsageError("--records goes with --summarize: python sweep.py --summarize RUN_DIR... --records DIR")
        return sweep(opts, main_args)        # a flag main.py's parser refuses: its one line, exit code 2


if __name__ == "__main__":
    sys.exit(cli())
