"""Train, evaluate and draw a VAE [AEVB] and a label-conditional VAE [M2, CVAE] on MNIST.

    python main.py                          # the MLP VAE, then the MLP CVAE, 10 epochs each
    python main.py --arch conv --model cvae # any field below is a flag: --latent-dim 2, ...
    python main.py --eval results/RUN/checkpoint.pt   # re-evaluate and redraw, no training

Each run writes checkpoint.pt, metrics.json and its pictures into a new folder under --out-dir.
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

try:
    import fcntl          # the writer lock's flock (POSIX); Windows has none, see writer_lock
except ImportError:
    fcntl = None

import bbans
import data
import explorer
import losses
import models
import viz


# ------------------------------------------------------------------------------------------------
# Hyperparameters: the one source of truth. Every field is also a flag (latent_dim -> --latent-dim).
# Defaults are the PyTorch example's protocol (784-400-20, Adam 1e-3, batch 128, 10 epochs, seed 1).
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # what to train
    model: str = field(default="both", metadata={"help": "vae, cvae, or both (the VAE, then the CVAE)"})
    arch: str = field(default="mlp", metadata={"help": "mlp (784-400-20) or conv (source B's: 32-64-128 channels, "
                                               "500 dense; see --conv-channels)"})
    latent_dim: int = field(default=20, metadata={"help": "size of the VAE's z"})
    cvae_latent_dim: int = field(default=2, metadata={"help": "size of the CVAE's z: small, so z holds the style "
                                                      "and y the class (README, 'Does the CVAE draw the digit asked for?')"})
    hidden_dim: int = field(default=0, metadata={"help": "units per dense hidden layer; 0 = the arch's default (mlp 400, conv 500)"})
    conv_channels: str = field(default="32,64,128", metadata={"help": "conv arch: channels of the encoder's conv layers, "
                                                            "mirrored by the decoder; the first two have stride 2 "
                                                            "(28 -> 14 -> 7), the rest stride 1"})
    hidden_layers: int = field(default=1, metadata={"help": "dense hidden layers in the encoder and in the decoder "
                                                    "(IWAE's MNIST model: 2 layers of 200, tanh)"})
    activation: str = field(default="relu", metadata={"help": "relu or tanh, after every hidden layer"})
    # how to train it
    epochs: int = field(default=10, metadata={"help": "passes over the training images"})
    batch_size: int = field(default=128, metadata={"help": "images per Adam step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (at the start of the schedule)"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant, cosine (from lr in epoch 1 towards 0 after the last), or iwae "
                                                          "(lr * 10^(-i/7) for 3^i epochs, i = 0..7, 3280 epochs; then the last rate)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam's epsilon (IWAE used 1e-4)"})
    beta: float = field(default=1.0, metadata={"help": "weight of the KL term in training; 1 = the true ELBO"})
    warmup_epochs: int = field(default=0, metadata={"help": "KL warm-up: the KL weight rises from 0 to --beta over "
                                                    "this many epochs; 0 = none"})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16: the networks run in bfloat16 during "
                                                   "training (torch.autocast; the ELBO's terms and all evaluation "
                                                   "stay float32); faster only where the CPU or GPU has bfloat16 "
                                                   "arithmetic (README, 'Speed')"})
    binarize: str = field(default="none", metadata={"help": "none (grey pixels, the PyTorch example) or dynamic "
                                                    "(training pixels redrawn ~ Bernoulli each use; val/test drawn once)"})
    val_size: int = field(default=10000, metadata={"help": "the last this-many training images validate (best "
                                                   "checkpoint, early stopping) instead of training; 0 = none"})
    patience: int = field(default=0, metadata={"help": "stop when the validation ELBO has not improved for this many "
                                               "epochs; 0 = never"})
    seed: int = field(default=1, metadata={"help": "seeds initialisation, shuffling, z samples and pictures"})
    # evaluation and housekeeping
    iw_samples: int = field(default=100, metadata={"help": "K of the importance-weighted test log-likelihood at the "
                                                   "end (papers: 5000); 0 = skip"})
    device: str = field(default="auto", metadata={"help": "auto (the accelerator torch finds: CUDA, MPS, XPU, ...; "
                                                  "else the CPU), cpu, or a device such as cuda, cuda:1, mps, xpu"})
    data_dir: str = field(default="data", metadata={"help": "folder holding MNIST/raw/; data (the default) is the "
                                                    "data/ beside main.py (shipped), from any working directory; "
                                                    "any other relative path is read from the working directory"})
    out_dir: str = field(default="results", metadata={"help": "each run writes a new folder in here"})
    max_batches: int = field(default=0, metadata={"help": "stop each epoch after this many batches (smoke runs); 0 = all"})
    eval: str = field(default="", metadata={"help": "path to a checkpoint (.pt): evaluate and draw it, no training"})
    resume: str = field(default="", metadata={"help": "path to a run's checkpoint.pt: continue that run where it stopped"})
    # lossless compression by bits-back coding (bbans.py), on the CPU
    compress: str = field(default="", metadata={"help": "path to a binarized VAE checkpoint: compress the binarized "
                                                "test set into a file, decode it back, compare with gzip/bz2/lzma/PNG"})
    decompress: str = field(default="", metadata={"help": "a file written by --compress: decode its images, "
                                                  "with the model given by --checkpoint"})
    checkpoint: str = field(default="", metadata={"help": "the VAE checkpoint --decompress decodes with (the one "
                                                  "--compress used)"})
    # two uses of a trained VAE (README, Results)
    one_class: str = field(default="", metadata={"help": "anomaly detection (anomaly.py): 'all' or digits like 3,8: a VAE "
                                                "per digit, trained on that digit's training images only"})
    impute: str = field(default="", metadata={"help": "path to a binarized VAE's checkpoint: fill in hidden quadrants of "
                                             "the test digits and score them (imputation.py)"})


CHOICES = {"model": ["vae", "cvae", "both"], "arch": ["mlp", "conv"],
           "activation": ["relu", "tanh"], "lr_schedule": ["constant", "cosine", "iwae"],
           "binarize": ["none", "dynamic"], "precision": ["fp32", "bf16"]}
# A resumed or evaluated run keeps its configuration; only these may change on the command line.
RESUMABLE = {"resume", "epochs", "patience", "iw_samples", "device", "data_dir"}
EVALUABLE = {"eval", "iw_samples", "seed", "device", "data_dir", "out_dir", "max_batches"}
EVAL_BATCH_SIZE = data.EVAL_BATCH_SIZE
PROJECT_DIR = Path(__file__).resolve().parent      # the default --data-dir is read from here, not the cwd
SEED_RANGE = (0, 2 ** 64 - 1)                      # what torch.manual_seed takes (negatives alias these)


class UsageError(Exception):
    """Bad input from the user: main() prints the message on one line and exits with code 2."""


def make_parser(with_defaults=True):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=None if with_defaults else argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, choices=CHOICES.get(f.name),
                            help=f"{f.metadata['help']} (default: {f.default!r})",
                            **({"default": f.default} if with_defaults else {}))
    parser.error = lambda message: fail(f"{message} (see python main.py --help)")
    return parser


def parse_args(argv=None):
    """(Config, the names of the fields given on the command line)."""
    cfg = Config(**vars(make_parser().parse_args(argv)))
    return cfg, set(vars(make_parser(with_defaults=False).parse_args(argv)))


def flag(name):
    return "--" + name.replace("_", "-")


def check_config(cfg):
    for name in ("epochs", "batch_size", "latent_dim", "cvae_latent_dim", "hidden_layers"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("hidden_dim", "max_batches", "warmup_epochs", "val_size", "patience", "iw_samples"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{flag(name)} must be 0 or more, got {getattr(cfg, name)}")
    for name in ("lr", "adam_eps"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"{flag(name)} must be a positive number, got {getattr(cfg, name)}")
    conv_channels(cfg)
    if not cfg.beta >= 0:
        raise UsageError(f"--beta must be 0 or more, got {cfg.beta}")
    if cfg.patience and not cfg.val_size:
        raise UsageError("--patience needs a validation set: give --val-size a positive value")
    if not SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed must be from {SEED_RANGE[0]} to 2**64 - 1 = {SEED_RANGE[1]}, got {cfg.seed}")
    if cfg.eval and cfg.resume:
        raise UsageError("--eval and --resume exclude each other: evaluate a checkpoint, or continue its run")


def conv_channels(cfg):
    """--conv-channels "32,64,128" -> (32, 64, 128), or a UsageError."""
    try:
        channels = tuple(int(c) for c in cfg.conv_channels.split(","))
    except ValueError:
        channels = ()
    if len(channels) < 2 or min(channels) < 1:
        raise UsageError(f"--conv-channels {cfg.conv_channels!r}: give two or more positive channel counts "
                         f"separated by commas, e.g. 32,64,128")
    return channels


def build_net(kind, cfg, device):
    """A new model of kind 'vae' or 'cvae' with the configuration's architecture, on device."""
    latent_dim = cfg.cvae_latent_dim if kind == "cvae" else cfg.latent_dim
    return models.build_model(kind, cfg.arch, latent_dim, cfg.hidden_dim, cfg.hidden_layers, cfg.activation,
                              conv_channels(cfg)).to(device)


def data_path(data_dir):
    """--data-dir as a path: "data" (the default) is the data/ folder beside main.py whatever the
    working directory (run from elsewhere it would otherwise try to download MNIST and retrain the
    judge); any other relative path is read from the working directory. Resolved where it is used,
    so configurations keep "data" and a run folder moved to another clone still finds its data."""
    return PROJECT_DIR / data_dir if data_dir == Config.data_dir else Path(data_dir)


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
    lock = run_dir / "writer.lock"
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


# ------------------------------------------------------------------------------------------------
# The objective, the schedules, one training epoch, and evaluation
# ------------------------------------------------------------------------------------------------
class Diverged(Exception):
    """A non-finite loss or gradient: training stops, the last good checkpoint stays."""


def elbo_terms(net, x, y, bf16=False):
    """(elbo, log_px, kl) per image, one z ~ q sampled per image: AEVB Eq. 10, or its conditional form.
    bf16: the networks' matrix products in bfloat16 (autocast); the ELBO's terms always in float32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        x_logits, mu, logvar = net(x, y)     # q(z|x) and p(x|z); CVAE: q(z|x, y) and p(x|y, z)
    x_logits, mu, logvar = x_logits.float(), mu.float(), logvar.float()     # no-ops in float32
    if isinstance(net, models.CVAE):
        return losses.conditional_elbo(x, x_logits, mu, logvar)
    return losses.elbo(x, x_logits, mu, logvar)


FUSED_ADAM_DEVICES = {"cpu", "cuda", "mps", "xpu", "hpu"}     # where torch.optim.Adam has a fused kernel


def make_optimizer(net, lr, eps):
    """Adam; the fused kernel updates all parameters in one call (about 10% of a CPU epoch saved),
    on the devices that have one; elsewhere the default (foreach) implementation."""
    # fused=None (not False) elsewhere: False would force the slow per-parameter loop
    fused = True if next(net.parameters()).device.type in FUSED_ADAM_DEVICES else None
    return torch.optim.Adam(net.parameters(), lr=lr, eps=eps, fused=fused)


IWAE_STAGES = 8       # Burda et al. 2015, §5: 3^i epochs at lr * 10^(-i/7), i = 0..7: 3280 epochs


def lr_at(epoch, lr, schedule, epochs):
    """The learning rate of `epoch` (1-based) under --lr-schedule, for a run of `epochs` epochs."""
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    if schedule == "iwae":            # stage i covers epochs (3^i + 1) / 2 ... (3^(i+1) - 1) / 2
        stage = next(i for i in itertools.count() if epoch <= (3 ** (i + 1) - 1) // 2)
        return lr * 10 ** (-min(stage, IWAE_STAGES - 1) / 7)     # after epoch 3280: the last rate
    return lr


def kl_weight(step, steps_per_epoch, beta, warmup_epochs):
    """β of step `step` (0-based, counted over the run): linear warm-up from 0 to beta."""
    if not warmup_epochs:
        return beta
    return beta * min(1.0, step / (warmup_epochs * steps_per_epoch))


def train_epoch(net, optimizer, x, y, cfg, generator, epoch):
    """One pass over (x, y); returns the epoch's mean −ELBO (β = 1), −log p(x|z) and KL, in nats."""
    net.train()
    sums, count = torch.zeros(3, device=x.device), 0
    steps = data.n_batches(len(x), cfg.batch_size, cfg.max_batches)
    with tqdm(data.batches(x, y, cfg.batch_size, generator, cfg.max_batches),
              total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False) as bar:   # closed on errors too
        for step, (xb, yb) in enumerate(bar):
            if cfg.binarize == "dynamic":
                xb = data.binarize_dynamic(xb)
            elbo, log_px, kl = elbo_terms(net, xb, yb, bf16=cfg.precision == "bf16")
            beta = kl_weight((epoch - 1) * steps + step, steps, cfg.beta, cfg.warmup_epochs)
            loss = -(log_px - beta * kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_finite(net, loss, epoch, step, cfg)
            optimizer.step()
            sums += torch.stack([-elbo.sum(), -log_px.sum(), kl.sum()]).detach()
            count += len(xb)
            if step % 50 == 0:
                bar.set_postfix_str(f"-ELBO {-elbo.mean().item():.1f}", refresh=False)
    neg_elbo, recon, kl = (sums / count).tolist()
    return {"train_neg_elbo": neg_elbo, "train_recon": recon, "train_kl": kl}


def check_finite(net, loss, epoch, step, cfg):
    """The NaN guard: stop before a non-finite loss or gradient reaches the weights."""
    grad_norm = torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]).norm()
    if torch.isfinite(loss + grad_norm):      # one check, one device sync
        return
    what = "loss" if not torch.isfinite(loss) else "gradient"
    raise Diverged(f"the {what} became {(loss + grad_norm).item()} at epoch {epoch}, batch {step + 1}: "
                   f"the run diverged, most likely the learning rate (--lr {cfg.lr:g}) is too high; "
                   f"lower it, or try --warmup-epochs")


@torch.no_grad()
def elbo_per_image(net, x, y, seed, max_batches=0):
    """(elbo, log_px, kl) of each image of (x, y), nats, one z ~ q per image, seeded: shape (3, n).
    The one estimate behind the test −ELBO (evaluate) and the anomaly scores (viz.anomalies)."""
    net.eval()
    terms = []
    with models.seeded(x.device, seed):
        for xb, yb in data.batches(x, y, EVAL_BATCH_SIZE, max_batches=max_batches):
            terms.append(torch.stack(elbo_terms(net, xb, yb)))           # (3, batch)
    return torch.cat(terms, dim=1)


def evaluate(net, x, y, seed, max_batches=0, prefix="test"):
    """−ELBO and its two terms, nats per image, on (x, y); z sampled once per image, seeded."""
    return mean_terms(elbo_per_image(net, x, y, seed, max_batches), prefix)


def mean_terms(terms, prefix="test"):
    """{prefix_neg_elbo, prefix_recon, prefix_kl}: the means of elbo_per_image's (3, n) terms."""
    elbo, log_px, kl = terms.mean(dim=1).tolist()
    return {f"{prefix}_neg_elbo": -elbo, f"{prefix}_recon": -log_px, f"{prefix}_kl": kl}


# ------------------------------------------------------------------------------------------------
# Does the CVAE draw the digit it is asked for? A separately trained classifier is the judge.
# ------------------------------------------------------------------------------------------------
CLASSIFIER_EPOCHS = 4


def train_classifier(train_set, test_set, seed):
    """The judge: a small convnet trained on MNIST; returns (net, test accuracy)."""
    x, y = train_set
    torch.manual_seed(seed)
    net = models.DigitClassifier().to(x.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(CLASSIFIER_EPOCHS):
        net.train()
        if epoch == CLASSIFIER_EPOCHS - 1:                  # a last epoch at a tenth of the rate
            optimizer.param_groups[0]["lr"] = 1e-4
        for xb, yb in tqdm(data.batches(x, y, 128, generator), total=data.n_batches(len(x), 128),
                           desc=f"classifier epoch {epoch + 1}/{CLASSIFIER_EPOCHS}", leave=False):
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval(), classifier_accuracy(net, *test_set)


@torch.no_grad()
def classifier_accuracy(net, x, y):
    net.eval()
    correct = sum((net(xb).argmax(1) == yb).sum().item() for xb, yb in data.batches(x, y, EVAL_BATCH_SIZE))
    return correct / len(x)


def load_classifier(data_dir, device, seed):
    """The classifier cached at data_dir/classifier.pt; if absent, trained (about a minute on a CPU)
    on the 60,000 grey training images and scored on the 10,000 test images, whatever the run."""
    path = data_path(data_dir) / "classifier.pt"
    if path.is_file():
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
            net = models.DigitClassifier().to(device)
            net.load_state_dict(ckpt["model"])
            return net.eval(), ckpt["test_accuracy"]
        except Exception as err:        # truncated, or another project's file: train a new judge
            print(f"warning: cannot use {path} ({type(err).__name__}); training a new classifier in its place")
    print(f"training the digit classifier that judges the CVAE's samples (once; cached in {path})")
    net, accuracy = train_classifier(*data.load_mnist(data_path(data_dir), device), seed)
    try:
        save_atomic(lambda p: torch.save({"model": net.state_dict(), "test_accuracy": accuracy}, p), path)
    except OSError as err:
        print(f"warning: could not cache the classifier in {path} ({err.strerror}); it is retrained next time")
    return net, accuracy


@torch.no_grad()
def sample_accuracy(net, classifier, seed, n_per_class=100):
    """How often a sample of p(x|y = d), z ~ N(0, I), is labelled d by the classifier, per digit d."""
    device = net.enc_mu.weight.device
    y = torch.arange(net.n_classes, device=device).repeat_interleave(n_per_class)
    with models.seeded(device, seed):
        hits = classifier(net.sample(len(y), y)).argmax(1) == y
    per_digit = hits.view(net.n_classes, n_per_class).double().mean(1)
    return {"overall": hits.double().mean().item(), "per_digit": per_digit.tolist()}


# ------------------------------------------------------------------------------------------------
# The final report: importance-weighted log-likelihood [IWAE], collapse diagnostics, sample accuracy
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_nll(net, x, y, k, seed, max_batches=0):
    """The test set's mean −log p(x) (CVAE: −log p(x|y)) in nats, from the k-sample importance-
    weighted bound L_k [IWAE §3], which approaches log p(x) from below as k grows."""
    net.eval()
    total, count = 0.0, 0
    batches = tqdm(data.batches(x, y, EVAL_BATCH_SIZE, max_batches=max_batches), leave=False,
                   total=data.n_batches(len(x), EVAL_BATCH_SIZE, max_batches), desc=f"log p(x), K = {k}")
    with models.seeded(x.device, seed), batches:
        for xb, yb in batches:
            # z arrives sample-major, (s * n, latent_dim), so the labels are repeated s times
            log_px = losses.iw_log_px(xb, lambda v: net.encode(v, yb),
                                      lambda z: net.decode(z, yb.repeat(len(z) // len(yb))), k)
            total += log_px.sum().item()
            count += len(xb)
    return -total / count


@torch.no_grad()
def latent_diagnostics(net, x, y, max_batches=0):
    """KL per latent dimension (test mean) and the active units of Burda et al. 2015 (§5.2)."""
    net.eval()
    mus, kls = [], []
    for xb, yb in data.batches(x, y, EVAL_BATCH_SIZE, max_batches=max_batches):
        mu, logvar = net.encode(xb, yb)
        mus.append(mu)
        kls.append(losses.kl_per_dim(mu, logvar))
    n_active, variance = losses.active_units(torch.cat(mus))
    return {"active_units": n_active, "unit_variance": variance.tolist(),
            "kl_per_dim": torch.cat(kls).mean(0).tolist()}


def final_report(net, cfg, epoch, sets, judge):
    """(report, per-image test −ELBO): the test −ELBO, NLL (nats and bits/dim), diagnostics and, for
    the CVAE, sample accuracy; the −ELBO of every test image, which the gallery's anomaly pictures show."""
    _, _, (x_test, y_test) = sets
    terms = elbo_per_image(net, x_test, y_test, cfg.seed)              # (3, n), every test image
    # the report honours --max-batches: the first batches' terms are the same draws evaluate() makes
    report = {"epoch": epoch, **mean_terms(terms[:, :cfg.max_batches * EVAL_BATCH_SIZE or None])}
    if cfg.iw_samples:
        nll = test_nll(net, x_test, y_test, cfg.iw_samples, cfg.seed, cfg.max_batches)
        report.update(iw_samples=cfg.iw_samples, test_nll=nll, test_bits_per_dim=losses.bits_per_dim(nll))
    report.update(latent_diagnostics(net, x_test, y_test, cfg.max_batches))
    line = f"test (epoch {epoch}): -ELBO {report['test_neg_elbo']:.2f}"
    if cfg.iw_samples:
        line += f", NLL {report['test_nll']:.2f} nats = {report['test_bits_per_dim']:.4f} bits/dim (K = {cfg.iw_samples})"
    print(f"{line}, active units {report['active_units']}/{len(report['kl_per_dim'])}")
    if isinstance(net, models.CVAE) and judge is not None:
        classifier, judge_accuracy = judge
        accuracy = sample_accuracy(net, classifier, cfg.seed)
        report["sample_accuracy"] = {**accuracy, "classifier_test_accuracy": judge_accuracy}
        print(f"samples labelled as the digit asked for: {100 * accuracy['overall']:.1f}% (per digit "
              f"{' '.join(f'{100 * a:.0f}' for a in accuracy['per_digit'])}; judge's test accuracy "
              f"{100 * judge_accuracy:.2f}%)")
    return report, -terms[0]


# ------------------------------------------------------------------------------------------------
# Data, pictures, checkpoints, and the three ways in: train, resume, or evaluate a checkpoint
# ------------------------------------------------------------------------------------------------
def load_sets(cfg, device):
    """(train, val, test) tensors; with --binarize dynamic, val and test binarized once, here."""
    train_set, test_set = data.load_mnist(data_path(cfg.data_dir), device)
    train_set, val_set = data.split_validation(train_set, cfg.val_size)
    if cfg.binarize == "dynamic":
        val_set = (data.binarize_once(val_set[0], "val"), val_set[1])
        test_set = (data.binarize_once(test_set[0], "test"), test_set[1])
    return train_set, val_set, test_set


def draw(net, test, history, report, neg_elbo, run_dir, seed):
    """Every picture of the model into run_dir: grids, the gallery of viz.py, the KL per dimension.
    neg_elbo: each test image's −ELBO (final_report's), the gallery's anomaly scores."""
    x_test, y_test = test
    net.eval()
    viz.reconstruction_grid(net, x_test, y_test, run_dir / "reconstructions.png")
    viz.sample_grid(net, run_dir / "samples.png", seed=seed)
    viz.sample_grid(net, run_dir / "samples_10.png", n=10, seed=seed)   # source B's eval output: 10 z ~ N(0, I)
    if isinstance(net, models.CVAE):
        viz.samples_by_class(net, run_dir / "samples_by_class.png", seed=seed)
    # the KL per dimension of the report orders the traversals and draws kl_per_dim.png: one computation
    viz.gallery(net, x_test, y_test, history, run_dir, seed, report["kl_per_dim"], neg_elbo)
    viz.kl_bars(report["kl_per_dim"], report["unit_variance"], run_dir / "kl_per_dim.png", viz.model_title(net))
    explorer.write_explorer(net, x_test, y_test, report, run_dir / "explorer.html", report["kl_per_dim"],
                            pictures=sorted(p.name for p in run_dir.glob("*.png")), seed=seed)


def save_checkpoint(net, optimizer, cfg, epoch, history, generator, path):
    """A plain dict: weights, configuration, epoch and metrics so far; with an optimizer, also its
    state and the random states that make a resumed run continue exactly as the uninterrupted one
    would have (checkpoint.pt). best.pt has none of these: a run resumes from its last epoch only."""
    ckpt = {"model": net.state_dict(), "model_args": models.model_args(net),
            "config": dataclasses.asdict(cfg), "epoch": epoch, "history": history}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
        ckpt["rng"] = {"torch": torch.get_rng_state(), "shuffle": generator.get_state(), **accelerator_rng()}
    save_atomic(lambda p: torch.save(ckpt, p), path)


def write_metrics(run_dir, run_cfg, net, history, **extra):
    """run_dir/metrics.json: the configuration, the model's arguments, one row per epoch, and extra.
    The `final` report of a finished run that is resumed is not dropped with the rewrite: it moves to
    `earlier_finals`, with `run_epochs`, the epochs its run had then, and the new `final` joins it."""
    path = run_dir / "metrics.json"
    old = read_json(path)
    earlier = old.get("earlier_finals", [])
    if "final" in old:
        run_epochs = old["epochs"][-1]["epoch"] if old.get("epochs") else None
        earlier = earlier + [{**old["final"], "run_epochs": run_epochs}]
    save_json({"config": dataclasses.asdict(run_cfg), "model_args": models.model_args(net), "epochs": history,
               **({"earlier_finals": earlier} if earlier else {}), **extra}, path)


def read_json(path):
    """The JSON object in path, or {} if there is none (it cannot be read, or holds another JSON value)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def read_checkpoint(path, device):
    """The checkpoint dict and the model it holds, or a UsageError that says what is wrong."""
    if not Path(path).is_file():
        raise UsageError(f"no checkpoint at {path}: pass the path of a .pt file written by main.py")
    try:
        return models.read_checkpoint(path, map_location=device)
    except models.ArchitectureMismatch as err:
        raise UsageError(f"{path}: {err}") from None
    except Exception as err:
        raise UsageError(f"{path} is not a usable checkpoint of this project, it may be truncated "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def saved_config(cfg, given, ckpt, may_change, what):
    """The checkpoint's configuration, with the flags in may_change taken from the command line; a
    flag outside it that differs from the checkpoint is refused. Unknown keys (a future or past
    version's) are dropped, missing ones take today's defaults."""
    fields = {f.name for f in dataclasses.fields(Config)}
    stored = {k: v for k, v in (ckpt.get("config") or {}).items() if k in fields}
    if stored.get("arch") == "conv" and "conv_channels" not in stored:   # written before the flag existed,
        args = ckpt["model_args"]                                        # when hidden_dim 0 meant 256
        stored.update(conv_channels=",".join(map(str, args.get("conv_channels") or models.LEGACY_CONV_CHANNELS)),
                      hidden_dim=args["hidden_dim"])
    saved = Config(**{**dataclasses.asdict(Config()), **stored})
    for name in sorted(given - may_change):
        if getattr(cfg, name) != getattr(saved, name):
            raise UsageError(f"{flag(name)} {getattr(cfg, name)} differs from the {what}'s {getattr(saved, name)}; "
                             f"the {what} keeps its configuration (only "
                             f"{', '.join(sorted(flag(n) for n in may_change - {'resume', 'eval'}))} may change)")
    return dataclasses.replace(saved, **{name: getattr(cfg, name) for name in given & may_change})


def train(kind, cfg, device, sets, resume=None):
    """Train one model (kind 'vae' or 'cvae') and write its run folder; returns the folder.
    With resume = (net, ckpt, run_dir), continue that run from the epoch after the checkpoint's."""
    torch.manual_seed(cfg.seed)
    # a resumed run continues the model its checkpoint holds (built from its model_args), so a
    # checkpoint written before a flag existed resumes whatever today's defaults say
    net = resume[0] if resume else build_net(kind, cfg, device)
    optimizer = make_optimizer(net, cfg.lr, cfg.adam_eps)
    generator = torch.Generator().manual_seed(cfg.seed)          # the shuffling order
    run_cfg = dataclasses.replace(cfg, model=kind, resume="")
    history, first = [], 1
    if resume:
        _, ckpt, run_dir = resume
        optimizer.load_state_dict(ckpt["optimizer"])
        history, first = ckpt["history"], ckpt["epoch"] + 1
        restore_rng(ckpt["rng"], generator)
        print(f"resuming {run_dir} after epoch {ckpt['epoch']}")
    else:
        run_dir = make_run_dir(cfg.out_dir, f"{kind}-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"{kind.upper()} ({cfg.arch}, latent {net.latent_dim}) on {device}: writing {run_dir}")
    with writer_lock(run_dir):
        train_epochs(net, optimizer, cfg, run_cfg, sets, generator, history, first, run_dir)
        finish(net, kind, cfg, run_cfg, history, sets, run_dir)
    return run_dir


def train_epochs(net, optimizer, cfg, run_cfg, sets, generator, history, first, run_dir):
    """Epochs first..cfg.epochs; after each, checkpoint.pt, best.pt (best validation ELBO so far)
    and metrics.json are rewritten, and the epoch's row is appended to history."""
    try:
        for epoch in range(first, cfg.epochs + 1):
            if stop_early(history, cfg):
                print(f"early stop: no better validation ELBO in the last {cfg.patience} epochs")
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch, cfg.lr, cfg.lr_schedule, cfg.epochs)
            row = train_and_evaluate(net, optimizer, cfg, sets, generator, epoch)
            so_far = history + [row]
            if cfg.val_size and all(row["val_neg_elbo"] < h["val_neg_elbo"] for h in history):  # first best
                save_checkpoint(net, None, run_cfg, epoch, so_far, generator, run_dir / "best.pt")
            save_checkpoint(net, optimizer, run_cfg, epoch, so_far, generator, run_dir / "checkpoint.pt")
            write_metrics(run_dir, run_cfg, net, so_far)
            history.append(row)
    except KeyboardInterrupt:
        saved = (run_dir / "checkpoint.pt").is_file()
        hint = f"; continue with: python main.py --resume {run_dir / 'checkpoint.pt'}" if saved else ""
        raise Interrupted(f"interrupted: {last_good(run_dir)}{hint}") from None
    except Diverged as err:
        raise Diverged(f"{err}; {last_good(run_dir)}") from None


def last_good(run_dir):
    """What the run folder holds now, read from the disk, not from memory."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return "no epoch had finished, so there is no checkpoint"
    return f"the last good checkpoint, {path}, holds epoch {torch.load(path, weights_only=True)['epoch']}"


class Interrupted(Exception):
    """Ctrl-C during training: the last finished epoch's checkpoint is on disk."""


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


def stop_early(history, cfg):
    if not (cfg.patience and history):
        return False
    best = min(range(len(history)), key=lambda i: history[i]["val_neg_elbo"])
    return len(history) - 1 - best >= cfg.patience


def train_and_evaluate(net, optimizer, cfg, sets, generator, epoch):
    """One epoch of training, then the validation and test ELBO; prints and returns the epoch's row."""
    train_set, val_set, test_set = sets
    start = time.perf_counter()
    row = {"epoch": epoch, **train_epoch(net, optimizer, *train_set, cfg, generator, epoch)}
    row["train_seconds"] = time.perf_counter() - start
    if cfg.val_size:
        row.update(evaluate(net, *val_set, cfg.seed, cfg.max_batches, prefix="val"))
    row.update(evaluate(net, *test_set, cfg.seed, cfg.max_batches))
    val = f"  val {row['val_neg_elbo']:8.2f}" if cfg.val_size else ""
    print(f"epoch {epoch:3d}  train -ELBO {row['train_neg_elbo']:8.2f}{val}  test -ELBO {row['test_neg_elbo']:8.2f}"
          f"  = recon {row['test_recon']:7.2f} + KL {row['test_kl']:6.2f}   ({row['train_seconds']:.1f} s)")
    return row


def finish(net, kind, cfg, run_cfg, history, sets, run_dir):
    """Report on the best model by validation ELBO (the last one without a validation set), draw it."""
    device = next(net.parameters()).device
    epoch = history[-1]["epoch"]
    if cfg.val_size:
        best, ckpt = read_checkpoint(run_dir / "best.pt", device)
        net.load_state_dict(best.state_dict())
        epoch = ckpt["epoch"]
    judge = load_classifier(cfg.data_dir, device, cfg.seed) if kind == "cvae" and not cfg.max_batches else None
    report, neg_elbo = final_report(net, cfg, epoch, sets, judge)     # a smoke run's data: a poor judge
    write_metrics(run_dir, run_cfg, net, history, final=report)
    draw(net, sets[2], history, report, neg_elbo, run_dir, cfg.seed)


def evaluate_checkpoint(cfg, given, net, ckpt):
    """--eval: test metrics and pictures of a saved model, in a new run folder, under the protocol
    it was trained with (binarization, seed), unless EVALUABLE flags say otherwise."""
    args = ckpt["model_args"]
    run_cfg = dataclasses.replace(saved_config(cfg, given, ckpt, EVALUABLE, "checkpoint"), val_size=0, resume="")
    device = next(net.parameters()).device
    sets = load_sets(run_cfg, device)
    run_dir = make_run_dir(cfg.out_dir, f"eval-{args['model']}-{args['arch']}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"{cfg.eval} (epoch {ckpt.get('epoch')}): writing {run_dir}")
    judge = load_classifier(run_cfg.data_dir, device, run_cfg.seed) if args["model"] == "cvae" else None
    report, neg_elbo = final_report(net, run_cfg, ckpt.get("epoch"), sets, judge)
    # "config": the settings this evaluation used (its --seed, --max-batches: a partial evaluation
    # says so); "trained_config": the checkpoint's own, as it was trained
    save_json({"checkpoint": str(cfg.eval), "config": dataclasses.asdict(run_cfg),
               "trained_config": ckpt.get("config"), "model_args": args, "eval": report,
               "epochs": ckpt.get("history", [])}, run_dir / "metrics.json")
    draw(net, sets[2], ckpt.get("history"), report, neg_elbo, run_dir, run_cfg.seed)
    return run_dir


def run(cfg, given=frozenset()):
    check_config(cfg)
    uses = dataclasses.replace(cfg, data_dir=str(data_path(cfg.data_dir)))    # what the uses below read
    if cfg.compress or cfg.decompress or cfg.checkpoint:     # lossless coding with a VAE: bbans.py
        return [compress_or_decompress(uses)]
    device = pick_device(cfg.device, cfg.precision)
    if cfg.one_class or cfg.impute:              # imported here: both modules import this one
        import anomaly, imputation
        return [anomaly.run(uses, device) if cfg.one_class else imputation.run(uses, device)]
    if cfg.eval:
        net, ckpt = read_checkpoint(cfg.eval, device)      # refuse a bad checkpoint before loading data
        return [evaluate_checkpoint(cfg, given, net, ckpt)]
    if cfg.resume:
        net, ckpt = read_checkpoint(cfg.resume, torch.device("cpu"))     # moved once the run's device is known
        if "rng" not in ckpt or "optimizer" not in ckpt:
            raise UsageError(f"{cfg.resume} holds no optimizer or random states (best.pt, a shipped model or "
                             f"an older checkpoint): resume from the run's checkpoint.pt")
        run_dir = Path(cfg.resume).parent
        cfg = dataclasses.replace(saved_config(cfg, given, ckpt, RESUMABLE, "resumed run"), eval="")
        check_config(cfg)
        device = pick_device(cfg.device, cfg.precision)   # the run's own, unless --device is given
        check_resume(cfg, ckpt)
        return [train(cfg.model, cfg, device, load_sets(cfg, device), (net.to(device), ckpt, run_dir))]
    sets = load_sets(cfg, device)
    kinds = ["vae", "cvae"] if cfg.model == "both" else [cfg.model]
    return [train(kind, cfg, device, sets) for kind in kinds]


def compress_or_decompress(cfg):
    """--compress CKPT, or --decompress FILE --checkpoint CKPT: bits-back coding (bbans.py), on the CPU."""
    if cfg.compress and cfg.decompress or cfg.eval or cfg.resume:
        raise UsageError("--compress and --decompress go alone: one of them, without --eval or --resume")
    if bool(cfg.decompress) != bool(cfg.checkpoint):
        raise UsageError("--decompress FILE needs --checkpoint CKPT (the model it was compressed with), "
                         "and --checkpoint serves only --decompress")
    path = cfg.compress or cfg.checkpoint
    net, ckpt = read_checkpoint(path, torch.device("cpu"))
    bbans.check_vae(path, ckpt)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if cfg.decompress:
        return bbans.decompress_command(cfg.decompress, path, net, make_run_dir(cfg.out_dir, f"bbans-decompress-{stamp}"))
    x_test = bbans.binarized_test_set(cfg.data_dir)
    neg_elbo = evaluate(net, x_test, torch.zeros(len(x_test), dtype=torch.long),
                        (ckpt.get("config") or {}).get("seed", 1))
    run_dir = make_run_dir(cfg.out_dir, f"bbans-vae-{ckpt['model_args']['arch']}-{stamp}")
    return bbans.compress_command(path, net, x_test, neg_elbo["test_neg_elbo"], run_dir)


def check_resume(cfg, ckpt):
    """A resumed run must have epochs left, and under the cosine schedule keep its length."""
    done, planned = ckpt["epoch"], ckpt["config"].get("epochs", cfg.epochs)
    if cfg.epochs <= done:
        raise UsageError(f"--epochs {cfg.epochs}: the checkpoint has already done {done} epochs; "
                         f"give --epochs more than {done} to train further, or --eval it")
    if cfg.lr_schedule == "cosine" and cfg.epochs != planned:
        raise UsageError(f"--epochs {cfg.epochs}: the cosine schedule of this run was laid out for {planned} "
                         f"epochs and would change under the epochs left; resume with --epochs {planned}, "
                         f"or start a new run")


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    cfg, given = parse_args(argv)
    try:
        run(cfg, given)
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


def stop_on_sigterm():
    """`kill PID` stops a run as Ctrl-C does (the last finished epoch kept, the resume command printed):
    a job started in the background with nohup or & ignores SIGINT, so SIGTERM is how it is stopped."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.modules["main"] = sys.modules[__name__]   # `import main` elsewhere gets this module, its UsageError
    stop_on_sigterm()
    main()
