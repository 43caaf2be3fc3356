"""A run on disk: its folder, the lock that keeps a second writer out, files written whole or not
at all, checkpoints as plain dicts, the random states that make a resumed run continue exactly,
the device a run uses, and how the command line ends (one line, an exit code).

Nothing here knows main.py's Config: configurations arrive as plain dicts, models as nn.Modules.
The machinery sits here so that main.py shows the training loop and not the plumbing around it.
"""
import contextlib
import datetime
import functools
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import data
import models

try:
    import fcntl          # the writer lock's flock (POSIX); Windows has none, see writer_lock
except ImportError:
    fcntl = None


class UsageError(Exception):
    """Bad input from the user: one_line_errors prints the message on one line and exits with code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during training: the last finished epoch's checkpoint is on disk."""


class Diverged(Exception):
    """A non-finite loss or gradient: training stops, the last good checkpoint stays."""


def flag(name):
    """The command-line spelling of a configuration field: latent_dim -> --latent-dim."""
    return "--" + name.replace("_", "-")


def fail(message, code=2):
    """The end of a command that went wrong: one line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def stop_on_sigterm():
    """`kill PID` stops a run as Ctrl-C does (the last finished epoch kept, the resume command printed):
    a job started in the background with nohup or & ignores SIGINT, so SIGTERM is how it is stopped."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


# ------------------------------------------------------------------------------------------------
# Run folders and the writer lock
# ------------------------------------------------------------------------------------------------
def make_run_dir(out_dir, name):
    """A new folder out_dir/name[-k]; never reuses one, so no run overwrites another."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for k in range(1, 1000):
            path = Path(out_dir) / (name if k == 1 else f"{name}-{k}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise UsageError(f"cannot create a run folder in {out_dir} ({err.strerror}): choose another --out-dir")
    raise UsageError(f"{out_dir} already holds 999 runs named {name}: choose another --out-dir")


@contextlib.contextmanager
def writer_lock(run_dir):
    """Hold run_dir/writer.lock while this process trains into run_dir, so that a second process
    (the same run resumed twice) is refused instead of overwriting the first's checkpoints.

    The lock is an flock(2) on the file, which the kernel releases when the process ends however it
    ends (kill -9 included), so a lock left by a dead process is no lock, and two processes can never
    both take over a stale one. The file holds "pid@host" only so the refusal can name the holder.
    Without fcntl (Windows) the file's existence is the lock: a leftover from a crash is refused
    until it is deleted by hand, as the message says; no guess about whether its process runs."""
    lock = Path(run_dir) / "writer.lock"
    f = open_lock(lock) if fcntl else open_exclusive(lock)
    try:
        f.write(f"{os.getpid()}@{socket.gethostname()}")
        f.flush()
        yield
    finally:
        if fcntl:
            lock.unlink(missing_ok=True)   # before the unlock: a waiter that opened it sees it is stale
            f.close()
        else:
            f.close()                      # Windows cannot delete a file that is still open
            lock.unlink(missing_ok=True)


def open_lock(lock):
    """lock opened and flock-ed by this process, emptied; a UsageError if another process holds it."""
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process"
            f.close()
            raise lock_refusal(lock, holder) from None
        if same_file(lock, f):
            f.truncate(0)
            return f
        f.close()      # its last holder removed the file after we opened it: lock the new one


def same_file(path, f):
    try:
        return os.path.samestat(os.stat(path), os.fstat(f.fileno()))
    except FileNotFoundError:
        return False


def open_exclusive(lock):
    """Without flock: create the lock file, refusing if it exists."""
    try:
        return os.fdopen(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w")
    except FileExistsError:
        raise lock_refusal(lock, lock.read_text().strip()) from None


def lock_refusal(lock, holder):
    return UsageError(f"{lock.parent} is being written by another process ({holder}, {lock}): wait for it or "
                      f"stop it" + ("" if fcntl else f"; if none runs there, delete {lock}"))


# ------------------------------------------------------------------------------------------------
# Files written whole or not at all
# ------------------------------------------------------------------------------------------------
def save_atomic(write, path):
    """Write through a temporary file and rename it, so a crash never leaves half a file at `path`."""
    tmp = Path(str(path) + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:             # an error or Ctrl-C: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise


def save_json(obj, path):
    save_atomic(lambda p: p.write_text(json.dumps(obj, indent=2)), path)


def json_target(path):
    """The path a script's --json will write to at its end, its folder made now: a path that cannot
    be written fails in one line before any work is done (None stays None)."""
    if path is None:
        return None
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--json {path}: cannot make its folder ({e.strerror}); give a path in a folder you can write")
    if Path(path).is_dir():
        fail(f"--json {path} is a folder; give a file name, e.g. {Path(path) / 'run.json'}")
    if not os.access(Path(path).parent, os.W_OK | os.X_OK):
        fail(f"--json {path}: its folder is not writable; give a path in a folder you can write")
    return path


def read_json(path):
    """The JSON object in path, or {} if there is none (it cannot be read, or holds another JSON value)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def write_metrics(run_dir, config, net, history, provenance=None, **extra):
    """run_dir/metrics.json: the configuration (a dict), the model's arguments, one row per epoch,
    the provenance of the process writing it, and extra. What a resumed run's file held is not
    dropped with the rewrite: a `final` report moves to `earlier_finals`, with `run_epochs`, the
    epochs its run had then; the provenance of an earlier process moves to `earlier_provenance`."""
    path = Path(run_dir) / "metrics.json"
    old = read_json(path)
    earlier = old.get("earlier_finals", [])
    if "final" in old:
        run_epochs = old["epochs"][-1]["epoch"] if old.get("epochs") else None
        earlier = earlier + [{**old["final"], "run_epochs": run_epochs}]
    before = old.get("earlier_provenance", [])
    if provenance and old.get("provenance") and old["provenance"].get("started_utc") != provenance["started_utc"]:
        before = before + [old["provenance"]]
    save_json({"config": config, "model_args": models.model_args(net), "epochs": history,
               **({"earlier_finals": earlier} if earlier else {}), **extra,
               **({"provenance": provenance} if provenance else {}),
               **({"earlier_provenance": before} if before else {})}, path)


# ------------------------------------------------------------------------------------------------
# Several runs of one command: the numbers each reports at its end, their mean ± std
# ------------------------------------------------------------------------------------------------
NO_REPORT = "no final report (a run of main.py that finished writes one in its metrics.json)"


def metrics_path(run):
    """A run folder's metrics.json, or a record (a metrics.json file itself, made small by record)."""
    run = Path(run)
    path = run if run.suffix == ".json" else run / "metrics.json"
    if not path.is_file():
        raise UsageError(f"{run}: no such record" if run.suffix == ".json" else f"{run}: {NO_REPORT}")
    return path


def end_metrics(run):
    """{name: number} that a run folder's metrics.json, or a record, reports at its end (end_metrics_of)."""
    return end_metrics_of(read_json(metrics_path(run)), run)


# What a report holds beside its results: the published numbers it quotes beside its own, and how it ran
ANCHORS = ("pyro_nn", "pyro_cvae", "deep_svdd_per_digit", "anchor_means")
NOT_RESULTS = ("config", "provenance", "model_args", "test_images", "n_images", "iw_samples", "n_chains",
               "chain_steps", "fit_steps", "fit_lr", "latent_bits", "torch_threads", "load_average_1min", *ANCHORS)


def end_metrics_of(record, where="this record"):
    """{name: number} that a metrics.json reports at its end: the `final` report of a training run,
    the `eval` of an --eval run, the AUROCs of a --one-class run, or the report of another mode
    (--compress, --impute: its results, not its settings nor the anchors it quotes); nested names joined
    with dots (sample_accuracy.overall), lists (per latent dimension) left out."""
    for key in ("final", "eval"):
        if isinstance(record.get(key), dict):
            return scalars({k: v for k, v in record[key].items() if k not in NOT_RESULTS})
    if record.get("mean_auroc") and record.get("per_digit"):
        return scalars({"mean_auroc": record["mean_auroc"],
                        "per_digit": {d: {"auroc": r["auroc"]} for d, r in record["per_digit"].items()}})
    if "provenance" in record and "epochs" not in record:
        return scalars({k: v for k, v in record.items() if k not in NOT_RESULTS})
    raise UsageError(f"{where}: {NO_REPORT}")


EPOCH_FIELDS = ("epoch", "train_neg_elbo", "val_neg_elbo", "train_seconds")


def record(metrics):
    """A run's metrics.json made small enough to ship as the record of its numbers: all of it but
    the per-epoch rows, which keep the epoch, the train and validation −ELBO and the seconds (to
    3 decimals), enough to redraw the loss curves."""
    rows = [{k: round(r[k], 3) if isinstance(r[k], float) else r[k] for k in EPOCH_FIELDS if k in r}
            for r in metrics.get("epochs", [])]
    return {**metrics, **({"epochs": rows} if "epochs" in metrics else {})}


def scalars(tree, prefix=""):
    """{dotted name: number} of the ints and floats in a nested dict (not booleans, not lists)."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{name}"] = value
    return out


def summarize(metrics, run_dirs):
    """{name: {mean, std, n, values, runs}} over runs, for every name in metrics (one {name: number}
    per run, in the order of run_dirs): the sample standard deviation (n − 1 in the denominator),
    None for a single run. A number some runs lack is summarised over those that have it."""
    names = list(dict.fromkeys(name for m in metrics for name in m))
    table = {}
    for name in names:
        have = [(m[name], str(r)) for m, r in zip(metrics, run_dirs) if name in m]
        values = [v for v, _ in have]
        table[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                       "n": len(values), "values": values, "runs": [r for _, r in have]}
    return table


# ------------------------------------------------------------------------------------------------
# Provenance: where a number came from, written by the run itself into its metrics.json
# ------------------------------------------------------------------------------------------------
PROJECT = Path(__file__).resolve().parent
STARTED = [time.time(), time.perf_counter()]        # reset by start_clock() when a command begins
COMMAND = list(sys.argv)


def start_clock(argv=None):
    """A command begins: its start time, its command line (sys.argv, or main.py and argv when main
    is called from Python), and the git state read afresh."""
    STARTED[:] = [time.time(), time.perf_counter()]
    COMMAND[:] = sys.argv if argv is None else ["main.py", *argv]
    git_state.cache_clear()


def provenance(device):
    """The versions, commit, machine, command and times behind a run's numbers: a plain dict that
    every metrics.json carries as "provenance" (Slurm's job ids too, when the run is a Slurm job)."""
    import numpy, torchvision           # here: only their versions are wanted
    device = torch.device(device)
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__, **git_state(),
            "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
            **({"cpu": cpu_info()} if device.type == "cpu" else {}),
            "hostname": socket.gethostname(), "argv": list(COMMAND),
            "started_utc": datetime.datetime.fromtimestamp(STARTED[0], datetime.timezone.utc)
                                            .isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - STARTED[1], 3),
            "load_average": load_average(),
            **{key.lower(): os.environ.get(key) for key in SLURM_KEYS}}


def stamp_provenance(run_dir, device):
    """Add this process's provenance to run_dir/metrics.json (a mode's record); returns run_dir."""
    path = Path(run_dir) / "metrics.json"
    save_json({**read_json(path), "provenance": provenance(device)}, path)
    return run_dir


def run_seconds(record):
    """The wall seconds a metrics.json's run took: its last process's and those of the processes
    before it (a resumed run), each as far as it last wrote."""
    processes = [record["provenance"], *record.get("earlier_provenance", [])]
    return sum(p["wall_seconds"] for p in processes), len(processes)


def load_average():
    """The machine's load over the last 1, 5 and 15 minutes as the OS reports it (None where it
    does not): above the thread count, the run's times were shared with other work."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


@functools.lru_cache(maxsize=1)
def git_state():
    """{commit, dirty}: the project's git commit and whether tracked files differ from it (None
    for both outside a git checkout, e.g. an unpacked release)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {"commit": commit, "dirty": dirty}


def device_name(device):
    """The processor as the OS names it (the CPU's model name), or the accelerator's own name."""
    if device.type == "cpu":
        return cpu_info().get("model name") or platform.processor() or platform.machine()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


# the instruction sets that decide this project's CPU speed (bfloat16 arithmetic above all)
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.lru_cache(maxsize=1)
def cpu_info():
    """{model name, cpu family, model, features}: what /proc/cpuinfo says of the first processor,
    the features among CPU_FEATURES; {} where there is no /proc/cpuinfo."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model name": fields.get("model name"), "cpu family": fields.get("cpu family"),
            "model": fields.get("model"), "features": [f for f in CPU_FEATURES if f in flags]}


# ------------------------------------------------------------------------------------------------
# Checkpoints: plain dicts (format, weights, model_args, config, epoch, history; optimizer and RNG)
# ------------------------------------------------------------------------------------------------
# Conv checkpoints written before the channels were a flag hold no "conv_channels": they were
# built with (32, 64), which read_checkpoint and merge_config therefore take when none is stored.
LEGACY_CONV_CHANNELS = (32, 64)

# 2: `config` holds what was trained (the hyperparameters) and nothing of how it ran (device, paths,
# --max-batches, --iw-samples). 1 (no `format` key): `config` held both.
CHECKPOINT_FORMAT = 2


def save_checkpoint(path, net, config, epoch, history, optimizer=None, generator=None):
    """A plain dict: the format, weights, hyperparameters (config, a dict), epoch and metrics so far;
    with an optimizer, also its state and the random states that make a resumed run continue as the
    uninterrupted one would have (checkpoint.pt). best.pt has neither: a run resumes from its last epoch."""
    ckpt = {"format": CHECKPOINT_FORMAT, "model": net.state_dict(), "model_args": models.model_args(net),
            "config": config, "epoch": epoch, "history": history}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
        ckpt["rng"] = {"torch": torch.get_rng_state(), "shuffle": generator.get_state(), **accelerator_rng()}
    save_atomic(lambda p: torch.save(ckpt, p), path)


def merge_config(ckpt, defaults, given, may_change, what, execution=()):
    """The configuration (a dict) a resumed or evaluated checkpoint runs under: the hyperparameters it
    stores, with the values given on the command line for the names in may_change; a given value
    outside may_change that differs from the stored one is refused. The names in `execution` (how a
    run runs: device, paths, ...) never come from the checkpoint, only from `given` or `defaults`,
    whatever an older checkpoint stored. Unknown keys (a past version's mode flags, a future
    version's fields) are dropped, missing ones take the defaults."""
    stored = {k: v for k, v in (ckpt.get("config") or {}).items() if k in defaults and k not in execution}
    if stored.get("arch") == "conv" and "conv_channels" not in stored:   # written before the flag existed,
        args = ckpt["model_args"]                                        # when hidden_dim 0 meant 256
        stored.update(conv_channels=",".join(map(str, args.get("conv_channels") or LEGACY_CONV_CHANNELS)),
                      hidden_dim=args["hidden_dim"])
    saved = {**defaults, **stored}
    for name in sorted(set(given) - set(may_change)):
        if given[name] != saved[name]:
            raise UsageError(f"{flag(name)} {given[name]} differs from the {what}'s {saved[name]}; the {what} "
                             f"keeps its configuration (only {', '.join(sorted(map(flag, may_change)))} may change)")
    return {**saved, **{name: value for name, value in given.items() if name in may_change}}


def rewrite_checkpoint(src, dst, defaults):
    """Write the checkpoint at src to dst in today's format: the same weights (bit for bit),
    model_args, epoch and history, and as config the hyperparameters it is read with (merge_config:
    defaults holds every hyperparameter's default, and only these are kept; what a format-1 file did
    not store, or stored under an older meaning, is filled in as --eval would read it). Optimizer and
    random states are left out: a rewritten checkpoint is a trained model, not a run to resume."""
    _, ckpt = read_checkpoint(src, torch.device("cpu"))
    config = merge_config(ckpt, defaults, {}, set(), "checkpoint")
    rewritten = {"format": CHECKPOINT_FORMAT, "model": ckpt["model"], "model_args": ckpt["model_args"],
                 "config": config, "epoch": ckpt["epoch"], "history": ckpt["history"]}
    save_atomic(lambda p: torch.save(rewritten, p), dst)


def read_checkpoint(path, device):
    """(the model it holds, in eval mode, on device; the checkpoint dict), or a UsageError that says
    what is wrong: the one reader of main.py's checkpoints."""
    if not Path(path).is_file():
        raise UsageError(f"no checkpoint at {path}: pass the path of a .pt file written by main.py")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        net = models.build_model(**{"conv_channels": LEGACY_CONV_CHANNELS, **ckpt["model_args"]})
        differ = shape_mismatches(net.state_dict(), ckpt["model"])
        if not differ:
            net.load_state_dict(ckpt["model"])
    except Exception as err:
        raise UsageError(f"{path} is not a usable checkpoint of this project, it may be truncated "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if differ:
        raise UsageError(f"{path}: the checkpoint holds another architecture: {differ} (checkpoint vs model)")
    return net.to(device).eval(), ckpt


def shape_mismatches(own, state):
    """The tensors of a state dict that do not fit the model's own, in words ('' if all fit)."""
    differ = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    return "; ".join(differ[:3] + [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {extra[:3]}"] * bool(extra))


def last_good(run_dir):
    """What the run folder holds now, read from the disk, not from memory."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        return "no epoch had finished, so there is no checkpoint"
    return f"the last good checkpoint, {path}, holds epoch {torch.load(path, weights_only=True)['epoch']}"


def accelerator_rng():
    """{device type: [random state of each device]} of the accelerator, if any ({} on a CPU)."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None:
        return {}
    module = torch.get_device_module(accelerator)
    if hasattr(module, "get_rng_state_all"):                        # CUDA, XPU: one state per device
        return {accelerator.type: module.get_rng_state_all()}
    return {accelerator.type: [module.get_rng_state()]}              # MPS: a single device


def restore_rng(rng, generator):
    """Set the random states a checkpoint saved; an accelerator's only where the same kind is here
    (a run moved from CUDA to the CPU continues with the CPU's stream, no longer bit for bit)."""
    torch.set_rng_state(rng["torch"].cpu())
    generator.set_state(rng["shuffle"].cpu())
    for kind, states in accelerator_rng().items():
        if len(rng.get(kind, [])) == len(states):
            module = torch.get_device_module(kind)
            if hasattr(module, "set_rng_state_all"):
                module.set_rng_state_all([state.cpu() for state in rng[kind]])
            else:
                module.set_rng_state(rng[kind][0].cpu())


# ------------------------------------------------------------------------------------------------
# The device, stopping cleanly, and the exit codes
# ------------------------------------------------------------------------------------------------
def pick_device(name, precision="fp32"):
    """--device: auto is the accelerator torch was built for and finds (CUDA, Apple MPS, Intel XPU,
    ...), else the CPU; a named device must be that accelerator, or the CPU."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)      # None: CPU only
    if name == "auto":
        device = accelerator or torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name}: not a device name; use auto, cpu, cuda, mps, xpu, ...") from None
        here = f"this machine's accelerator is {accelerator.type}" if accelerator else "this machine has none"
        if device.type != "cpu" and (accelerator is None or device.type != accelerator.type):
            raise UsageError(f"--device {name} was asked for but {device.type} is not available ({here}): "
                             f"use --device auto or cpu")
        if device.type != "cpu" and (device.index or 0) >= torch.accelerator.device_count():
            raise UsageError(f"--device {name}: there are only {torch.accelerator.device_count()} "
                             f"{device.type} devices; use --device {device.type}")
    if precision == "bf16" and not torch.amp.is_autocast_available(device.type):
        raise UsageError(f"--precision bf16 needs torch.autocast, which {device.type} lacks: use --precision fp32")
    return device


@contextlib.contextmanager
def stopping_cleanly(run_dir, flags=()):
    """Ctrl-C, `kill` or a diverged step inside: stop with one line that says what the run folder
    holds on disk and how to continue (with `flags`, the settings --resume must be given again);
    the finished epochs' checkpoints stay."""
    try:
        yield
    except KeyboardInterrupt:
        saved = (run_dir / "checkpoint.pt").is_file()
        command = shlex.join(["python", "main.py", "--resume", str(run_dir / "checkpoint.pt"), *flags])
        hint = f"; continue with: {command}" if saved else ""
        raise Interrupted(f"interrupted: {last_good(run_dir)}{hint}") from None
    except Diverged as err:
        raise Diverged(f"{err}; {last_good(run_dir)}") from None


@contextlib.contextmanager
def one_line_errors():
    """Whatever stops a command ends it with one line on stderr and an exit code: 2 for bad input,
    1 for a run that failed (diverged, out of memory, disk), 130 for Ctrl-C or kill; no traceback."""
    try:
        yield
    except (UsageError, data.DataError) as err:
        fail(str(err))
    except Diverged as err:
        fail(str(err), code=1)
    except torch.OutOfMemoryError as err:
        fail(f"out of memory on the device ({str(err).splitlines()[0][:120]}): try a smaller --batch-size, "
             f"or --device cpu; the checkpoints of finished epochs, if any, are in the run folder", code=1)
    except Interrupted as err:
        fail(str(err), code=130)
    except OSError as err:
        fail(f"cannot read or write {err.filename or 'a file'} ({err.strerror}): free some space or fix the "
             f"permissions; the checkpoints of finished epochs, if any, are still in the run folder", code=1)
    except KeyboardInterrupt:
        fail("interrupted: what this step was writing is not saved; the checkpoints of finished epochs "
             "are (python main.py --eval RUN/best.pt or RUN/checkpoint.pt redoes the final report)", code=130)
