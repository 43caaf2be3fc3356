"""Train, evaluate and draw a VAE [AEVB] and a label-conditional VAE [M2, CVAE] on MNIST.

    python main.py                          # the MLP VAE, then the MLP CVAE, 10 epochs each
    python main.py --arch conv --model cvae # any field of Config is a flag: --latent-dim 2, ...
    python main.py @configs/binarized-vae.args        # a recipe: the flags of a published number
    python main.py --eval results/RUN/checkpoint.pt   # re-evaluate and redraw, no training

Each run writes checkpoint.pt, metrics.json, its pictures and explorer.html into a new folder
under --out-dir. Read top to bottom: the hyperparameters, train() with the epoch loop, one epoch
and the evaluation, the final report, the modes, the command line. Paper tags as in losses.py.
"""
import argparse
import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import anomaly
import data
import explorer
import imputation
import judge
import losses
import models
import runs
import viz
from runs import UsageError


# ------------------------------------------------------------------------------------------------
# Hyperparameters: the one source of truth. Every field is also a flag (latent_dim -> --latent-dim).
# Defaults: the PyTorch example's model and optimiser (784-400-20, Adam 1e-3, batch 128, 10 epochs,
# seed 1), with the last 10,000 training images held out to validate (--val-size 0: none).
# ------------------------------------------------------------------------------------------------
def option(default, help):
    """A field of Config or Mode, and so a flag: its default and the help --help prints."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    model: str = option("both", "vae, cvae, or both (the VAE, then the CVAE)")
    arch: str = option("mlp", "mlp (784-400-20) or conv (convolutions of 32, 64, 128 channels, then a 500-unit "
                              "dense layer; see --conv-channels)")
    latent_dim: int = option(20, "size of z; with --model both the VAE's only (the CVAE's is --cvae-latent-dim)")
    cvae_latent_dim: int = option(2, "size of the CVAE's z when --latent-dim is not given with --model cvae: "
                                     "small, so z holds the style and y the class")
    hidden_dim: int = option(0, "units per dense hidden layer; 0 = the arch's default (mlp 400, conv 500)")
    conv_channels: str = option("32,64,128", "conv arch: channels of the encoder's conv layers, mirrored by the "
                                             "decoder; the first two have stride 2 (28 -> 14 -> 7), the rest "
                                             "stride 1")
    hidden_layers: int = option(1, "dense hidden layers in the encoder and in the decoder (IWAE's MNIST model: 2 "
                                   "layers of 200, tanh)")
    activation: str = option("relu", "relu or tanh, after every hidden layer")
    # how to train it
    epochs: int = option(10, "passes over the training images")
    batch_size: int = option(128, "images per Adam step")
    lr: float = option(1e-3, "Adam learning rate (at the start of the schedule)")
    lr_schedule: str = option("constant", "constant, cosine (from lr in epoch 1 towards 0 after the last), or "
                                          "iwae (lr * 10^(-i/7) for 3^i epochs, i = 0..7, 3280 epochs; then the "
                                          "last rate)")
    adam_eps: float = option(1e-8, "Adam's epsilon (IWAE used 1e-4)")
    beta: float = option(1.0, "weight of the KL term in training; 1 = the true ELBO")
    warmup_epochs: int = option(0, "KL warm-up: the KL weight rises from 0 to --beta over this many epochs; 0 = "
                                   "none")
    precision: str = option("fp32", "fp32, or bf16: the networks run in bfloat16 during training "
                                    "(torch.autocast; the ELBO's terms and all evaluation stay float32); faster "
                                    "only where the CPU or GPU has bfloat16 arithmetic")
    binarize: str = option("none", "none (grey pixels, the PyTorch example) or dynamic (training pixels redrawn "
                                   "~ Bernoulli each use; val/test drawn once)")
    val_size: int = option(10000, "the last this-many training images validate (best checkpoint, early stopping) "
                                  "instead of training; 0 = none")
    patience: int = option(0, "stop when the validation ELBO has not improved for this many epochs; 0 = never")
    seed: int = option(1, "seeds initialisation, shuffling, z samples and pictures")
    # evaluation and housekeeping
    iw_samples: int = option(100, "K of the importance-weighted test log-likelihood at the end (papers: 5000); 0 "
                                  "= skip")
    device: str = option("auto", "auto (the accelerator torch finds: CUDA, MPS, XPU, ...; else the CPU), cpu, or "
                                 "a device such as cuda, cuda:1, mps, xpu")
    data_dir: str = option(data.DEFAULT_DATA_DIR, "folder holding MNIST/raw/; data (the default) is the data/ "
                                                  "beside main.py (shipped), from any working directory; any "
                                                  "other relative path is read from the working directory")
    out_dir: str = option("results", "each run writes a new folder in here")
    max_batches: int = option(0, "every pass over a data set stops after this many batches (a training epoch: "
                                 "--batch-size images each; evaluation, likelihoods, anomaly scores, imputation: "
                                 "1000 each), and the CVAE's judge is skipped: for smoke runs; 0 = all")


@dataclass
class Mode:
    """What to do instead of training, at most one. Not hyperparameters: no checkpoint stores them."""
    eval: str = option("", "a checkpoint (.pt): evaluate and draw it, no training")
    resume: str = option("", "a run's checkpoint.pt: continue that run where it stopped")
    compress: str = option("", "a binarized VAE's checkpoint: code the binarized test set by bits-back coding")
    decompress: str = option("", "a file written by --compress: decode it with the model of --checkpoint")
    checkpoint: str = option("", "the VAE checkpoint --decompress decodes with (the one --compress used)")
    one_class: str = option("", "'all' or digits like 3,8: a VAE per digit trained on it alone scores the test set")
    impute: str = option("", "a binarized VAE's checkpoint: fill in hidden quadrants of test digits, score them")


# -------- Training: the epoch loop ----------------------------------------------------------------
# How a run ran, not what it trained: checkpoints leave these out, and --eval and --resume take them
# from their own command line (and its defaults), never from the checkpoint.
EXECUTION = {"device", "data_dir", "out_dir", "max_batches", "iw_samples"}


@dataclass
class Resumed:
    """A run that --resume continues: the model and dict of its checkpoint.pt, and its folder."""
    net: torch.nn.Module
    checkpoint: dict
    run_dir: Path


def train(kind, cfg, device, sets, resumed=None):
    """Train one model (kind 'vae' or 'cvae'), write its run folder, return the folder. The test set
    is read once, by the final report; the epochs see the training and validation sets only."""
    torch.manual_seed(cfg.seed)
    net = resumed.net if resumed else build_net(kind, cfg, device)
    optimizer = make_optimizer(net, cfg.lr, cfg.adam_eps)
    generator = torch.Generator().manual_seed(cfg.seed)          # the shuffling order
    config = dataclasses.asdict(dataclasses.replace(cfg, model=kind))    # metrics.json: how it ran too
    trained = hyperparameters(config)                                     # checkpoints: what was trained
    history, first = [], 1
    if resumed:
        optimizer.load_state_dict(resumed.checkpoint["optimizer"])
        history, first = resumed.checkpoint["history"], resumed.checkpoint["epoch"] + 1
        runs.restore_rng(resumed.checkpoint["rng"], generator)
        run_dir = resumed.run_dir
        print(f"resuming {run_dir} after epoch {resumed.checkpoint['epoch']}")
    else:
        run_dir = runs.make_run_dir(cfg.out_dir, run_name(kind, cfg))
    print(f"{kind.upper()} ({cfg.arch}, latent {net.latent_dim}) on {device}: writing {run_dir}")
    if not cfg.val_size:
        print("no validation set (--val-size 0): the final report is on the last epoch")
    train_set, val_set, test_set = sets
    with runs.writer_lock(run_dir):
        with runs.stopping_cleanly(run_dir, resume_flags(cfg, resumed)):
            for epoch in range(first, cfg.epochs + 1):
                if stop_early(history, cfg.patience):
                    print(f"early stop: no better validation ELBO in the last {cfg.patience} epochs")
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch, cfg.lr, cfg.lr_schedule, cfg.epochs)
                start = time.perf_counter()
                row = {"epoch": epoch, **train_epoch(net, optimizer, *train_set, cfg, generator, epoch)}
                row["train_seconds"] = time.perf_counter() - start
                if cfg.val_size:
                    row.update(evaluate(net, *val_set, cfg.seed, cfg.max_batches, prefix="val")[0])
                print(epoch_line(row))
                if cfg.val_size and all(row["val_neg_elbo"] < h["val_neg_elbo"] for h in history):  # a new best
                    runs.save_checkpoint(run_dir / "best.pt", net, trained, epoch, history + [row])
                history.append(row)
                runs.save_checkpoint(run_dir / "checkpoint.pt", net, trained, epoch, history,
                                     optimizer=optimizer, generator=generator)
                runs.write_metrics(run_dir, config, net, history, provenance=runs.provenance(device))
        # The test set, once: the model of the best validation epoch (the last one without validation)
        epoch = best_epoch(history) if cfg.val_size else history[-1]["epoch"]
        if cfg.val_size:
            net.load_state_dict(runs.read_checkpoint(run_dir / "best.pt", device)[0].state_dict())
        report, neg_elbo = final_report(net, cfg, epoch, test_set)
        runs.write_metrics(run_dir, config, net, history, provenance=runs.provenance(device), final=report)
        viz.draw_run(net, *test_set, history, report, neg_elbo, run_dir, cfg.seed)
        write_page(net, test_set, report, run_dir, cfg.seed)
    return run_dir


def resume_flags(cfg, resumed=None):
    """The flags the command that continues a stopped run must repeat: the execution settings that
    differ from their defaults (out_dir aside; --resume takes them from its own command line, never
    from the checkpoint: a recipe's --iw-samples 5000, say), and for a resumed run the --epochs and
    --patience it was given, which its checkpoint.pt holds only once an epoch of it has ended."""
    default = Config()
    names = [n for n in sorted(EXECUTION - {"out_dir"}) if getattr(cfg, n) != getattr(default, n)]
    if resumed:
        names += [n for n in ("epochs", "patience") if getattr(cfg, n) != resumed.checkpoint["config"].get(n)]
    return [part for n in names for part in (f"--{n.replace('_', '-')}", str(getattr(cfg, n)))]


def hyperparameters(config):
    """What a checkpoint stores of a configuration (a dict): what was trained, not how it ran."""
    return {k: v for k, v in config.items() if k not in EXECUTION}


def epoch_line(row):
    """The line printed after each epoch: the training and validation −ELBO, never the test set's."""
    val = (f"  val -ELBO {row['val_neg_elbo']:8.2f} = recon {row['val_recon']:7.2f} + KL {row['val_kl']:6.2f}"
           if "val_neg_elbo" in row else "")
    return f"epoch {row['epoch']:3d}  train -ELBO {row['train_neg_elbo']:8.2f}{val}   ({row['train_seconds']:.1f} s)"


def best_epoch(history):
    """The epoch with the lowest validation −ELBO (the first of equals): best.pt's."""
    return min(history, key=lambda h: h["val_neg_elbo"])["epoch"]


def build_net(kind, cfg, device):
    """A new model of kind 'vae' or 'cvae' with the configuration's architecture, on device."""
    latent_dim = cfg.cvae_latent_dim if kind == "cvae" else cfg.latent_dim
    return models.build_model(kind, cfg.arch, latent_dim, cfg.hidden_dim, cfg.hidden_layers, cfg.activation,
                              conv_channels(cfg)).to(device)


FUSED_ADAM_DEVICES = {"cpu", "cuda", "mps", "xpu", "hpu"}     # where torch.optim.Adam has a fused kernel


def make_optimizer(net, lr, eps):
    """Adam; the fused kernel updates all parameters in one call (about 10% of a CPU epoch saved),
    on the devices that have one; elsewhere the default (foreach) implementation."""
    # fused=None (not False) elsewhere: False would force the slow per-parameter loop
    fused = True if next(net.parameters()).device.type in FUSED_ADAM_DEVICES else None
    return torch.optim.Adam(net.parameters(), lr=lr, eps=eps, fused=fused)


def write_page(net, test_set, report, run_dir, seed):
    """explorer.html, after the pictures, so that the page links every one of them."""
    explorer.write_explorer(net, *test_set, report, run_dir / "explorer.html", report["kl_per_dim"],
                            pictures=sorted(p.name for p in Path(run_dir).glob("*.png")), seed=seed)


def run_name(prefix, cfg=None):
    """A new run folder's name: prefix-arch-seedS-date-time (prefix-date-time without a cfg)."""
    return "-".join([prefix, *([cfg.arch, f"seed{cfg.seed}"] if cfg else []), time.strftime("%Y%m%d-%H%M%S")])


def stop_early(history, patience):
    """Whether the best validation ELBO so far is `patience` or more epochs old (never with patience 0)."""
    best = min(range(len(history)), key=lambda i: history[i]["val_neg_elbo"]) if patience and history else None
    return best is not None and len(history) - 1 - best >= patience


# -------- One epoch: the β-weighted negative ELBO, minimised by Adam ------------------------------
def elbo_terms(net, x, y, bf16=False):
    """(elbo, log_px, kl) per image, one z ~ q sampled per image: AEVB Eq. 10, or its conditional form.
    bf16: the networks' matrix products in bfloat16 (autocast); the ELBO's terms always in float32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        x_logits, mu, logvar = net(x, y)     # q(z|x) and p(x|z); CVAE: q(z|x, y) and p(x|y, z)
    x_logits, mu, logvar = x_logits.float(), mu.float(), logvar.float()     # no-ops in float32
    if isinstance(net, models.CVAE):
        return losses.conditional_elbo(x, x_logits, mu, logvar)
    return losses.elbo(x, x_logits, mu, logvar)


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
    steps = data.n_batches(len(x), cfg.batch_size, cfg.max_batches)
    watch = EpochWatch(net, x.device, steps, epoch, cfg)     # the NaN guard, the sums and the progress bar
    with watch.bar(data.batches(x, y, cfg.batch_size, generator, cfg.max_batches)) as batches:
        for step, (xb, yb) in enumerate(batches):
            if cfg.binarize == "dynamic":
                xb = data.binarize_dynamic(xb)                               # x ~ Bernoulli(pixels)
            elbo, log_px, kl = elbo_terms(net, xb, yb, bf16=cfg.precision == "bf16")    # one z ~ q(z|x)
            beta = kl_weight((epoch - 1) * steps + step, steps, cfg.beta, cfg.warmup_epochs)
            loss = -(log_px - beta * kl).mean()        # −(log p(x|z) − β KL), averaged over the batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            watch.step(step, loss, elbo, log_px, kl)   # stops the run before a non-finite step is taken
            optimizer.step()
    return watch.means()


# How often the NaN guard reads the device: every step on the CPU, where a read costs nothing, every
# SYNC_EVERY-th on an accelerator, where each read stalls its queue of kernels (the bar reads it as often).
SYNC_EVERY, GUARD_EVERY = 50, {"cpu": 1}


class EpochWatch:
    """What train_epoch does besides the step: the NaN guard (is the loss, and the gradient norm,
    finite?), the epoch's sums of the ELBO's terms, and the progress bar; on an accelerator it reads
    the device only every SYNC_EVERY steps."""
    def __init__(self, net, device, steps, epoch, cfg):
        self.net, self.steps, self.epoch, self.lr, self.epochs = net, steps, epoch, cfg.lr, cfg.epochs
        self.check_every = GUARD_EVERY.get(device.type, SYNC_EVERY)
        self.finite, self.checked = torch.ones((), dtype=torch.bool, device=device), 0
        self.sums, self.count = torch.zeros(3, device=device), 0

    def bar(self, batches):
        self.progress = tqdm(batches, total=self.steps, desc=f"epoch {self.epoch}/{self.epochs}", leave=False)
        return self.progress                   # a context manager: the bar is closed on errors too

    def step(self, step, loss, elbo, log_px, kl):
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        self.finite &= torch.isfinite(loss + torch.nn.utils.get_total_norm(grads))
        if (step + 1) % self.check_every == 0 or step + 1 == self.steps:
            check_finite(self.finite, loss, self.epoch, (self.checked + 1, step + 1), self.lr)
            self.checked = step + 1
        self.sums += torch.stack([-elbo.sum(), -log_px.sum(), kl.sum()]).detach()
        self.count += len(elbo)
        if step % SYNC_EVERY == 0:
            self.progress.set_postfix_str(f"-ELBO {-elbo.mean().item():.1f}", refresh=False)

    def means(self):
        neg_elbo, recon, kl = (self.sums / self.count).tolist()
        return {"train_neg_elbo": neg_elbo, "train_recon": recon, "train_kl": kl}


def check_finite(finite, loss, epoch, batches, lr):
    """The NaN guard: stop before a non-finite loss or gradient of the batches checked reaches the
    weights (on an accelerator, the steps between two checks have been taken already)."""
    if finite.item():                      # the one device read
        return
    where = f"batch {batches[1]}" if batches[0] == batches[1] else f"one of batches {batches[0]}-{batches[1]}"
    what, value = ("loss", loss.item()) if not torch.isfinite(loss) else ("gradient", "non-finite")
    what, value = (what, value) if batches[0] == batches[1] else ("loss or its gradient", "non-finite")
    raise runs.Diverged(f"the {what} became {value} at epoch {epoch}, {where}: the run diverged, most likely "
                        f"the learning rate (--lr {lr:g}) is too high; lower it, or try --warmup-epochs")


# -------- Evaluation: the test −ELBO, the IW log-likelihood [IWAE], the latent diagnostics ----------
@torch.no_grad()
def evaluate(net, x, y, seed, max_batches=0, prefix="test"):
    """({prefix_neg_elbo, prefix_recon, prefix_kl}: the means in nats per image, the −ELBO of each
    image): AEVB Eq. 10 on (x, y), its first max_batches batches (0: all), one z ~ q per image, seeded.
    The CVAE's bound on log p(x|y) is the same formula on its conditioned networks (losses.conditional_elbo)."""
    net.eval()
    terms = []
    with data.seeded(x.device, seed):
        for xb, yb in data.batches(x, y, data.EVAL_BATCH_SIZE, max_batches=max_batches):
            x_logits, mu, logvar = net(xb, yb)          # q(z|x) and p(x|z); CVAE: q(z|x, y) and p(x|y, z)
            terms.append(torch.stack(losses.elbo(xb, x_logits, mu, logvar)))   # (elbo, log_px, kl): (3, batch)
    terms = torch.cat(terms, dim=1)                     # (3, n)
    elbo, log_px, kl = terms.mean(dim=1).tolist()
    return {f"{prefix}_neg_elbo": -elbo, f"{prefix}_recon": -log_px, f"{prefix}_kl": kl}, -terms[0]


@torch.no_grad()
def iw_nll(net, x, y, k, seed, max_batches=0):
    """The mean −log p(x) (CVAE: −log p(x|y)) in nats, from the k-sample importance-weighted bound
    L_k [IWAE §3], which approaches log p(x) from below as k grows."""
    net.eval()
    total, count = 0.0, 0
    batches = tqdm(data.batches(x, y, data.EVAL_BATCH_SIZE, max_batches=max_batches), leave=False,
                   total=data.n_batches(len(x), data.EVAL_BATCH_SIZE, max_batches), desc=f"log p(x), K = {k}")
    with data.seeded(x.device, seed), batches:
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
    for xb, yb in data.batches(x, y, data.EVAL_BATCH_SIZE, max_batches=max_batches):
        mu, logvar = net.encode(xb, yb)
        mus.append(mu)
        kls.append(losses.kl_per_dim(mu, logvar))
    n_active, variance = losses.active_units(torch.cat(mus))
    return {"active_units": n_active, "unit_variance": variance.tolist(),
            "kl_per_dim": torch.cat(kls).mean(0).tolist()}


def final_report(net, cfg, epoch, test_set):
    """(report, per-image test −ELBO): the test −ELBO, NLL (nats and bits/dim), diagnostics and, for
    the CVAE, how often its samples are the digit asked for; the −ELBO of every test image, which the
    gallery's anomaly pictures show."""
    x_test, y_test = test_set
    test, neg_elbo = evaluate(net, x_test, y_test, cfg.seed)           # every test image: the gallery's too
    if cfg.max_batches:              # the report honours --max-batches: the same draws, its first batches
        test = evaluate(net, x_test, y_test, cfg.seed, cfg.max_batches)[0]
    report = {"epoch": epoch, **test}
    if cfg.iw_samples:
        nll = iw_nll(net, x_test, y_test, cfg.iw_samples, cfg.seed, cfg.max_batches)
        report.update(iw_samples=cfg.iw_samples, test_nll=nll, test_bits_per_dim=losses.bits_per_dim(nll))
    report.update(latent_diagnostics(net, x_test, y_test, cfg.max_batches))
    shown = (f", NLL {report['test_nll']:.2f} nats = {report['test_bits_per_dim']:.4f} bits/dim (K = {cfg.iw_samples})"
             if cfg.iw_samples else "")
    print(f"test (epoch {epoch}): -ELBO {report['test_neg_elbo']:.2f}{shown}, active units "
          f"{report['active_units']}/{len(report['kl_per_dim'])}")
    if isinstance(net, models.CVAE) and not cfg.max_batches:      # a smoke run's data would make a poor judge
        report["sample_accuracy"] = judge.judged_accuracy(net, cfg.data_dir, cfg.seed)
    return report, neg_elbo


# -------- The modes: each reads its inputs, calls a library, writes one new run folder ------------
# A resumed or evaluated checkpoint keeps the hyperparameters it was trained with; these may change,
# and the execution settings come from the command line and its defaults, never from the checkpoint.
RESUMABLE = {"epochs", "patience"} | EXECUTION - {"out_dir"}       # a resumed run writes in its own folder
EVALUABLE = EXECUTION | {"seed"}


def evaluate_checkpoint(path, cfg, given):
    """--eval: test metrics and pictures of a saved model, in a new run folder, under the protocol it
    was trained with (binarization; its seed unless --seed is given) and the execution settings of
    this command line (--iw-samples, --max-batches, ... and their defaults); its metrics.json holds
    the settings used ("config") and the checkpoint's own ("trained_config")."""
    device = runs.pick_device(cfg.device)
    net, ckpt = runs.read_checkpoint(path, device)        # refuse a bad checkpoint before loading data
    args = ckpt["model_args"]
    run_cfg = dataclasses.replace(saved_config(cfg, given, ckpt, EVALUABLE, "checkpoint"), val_size=0, arch=net.arch)
    _, _, test_set = data.load_sets(run_cfg.data_dir, 0, run_cfg.binarize, device)
    run_dir = runs.make_run_dir(cfg.out_dir, "eval-" + run_name(args["model"], run_cfg))
    print(f"{path} (epoch {ckpt.get('epoch')}): writing {run_dir}")
    report, neg_elbo = final_report(net, run_cfg, ckpt.get("epoch"), test_set)
    runs.save_json({"checkpoint": str(path), "config": dataclasses.asdict(run_cfg),
                    "trained_config": ckpt.get("config"), "model_args": args, "eval": report,
                    "epochs": ckpt.get("history", []), "provenance": runs.provenance(device)},
                   run_dir / "metrics.json")
    viz.draw_run(net, *test_set, ckpt.get("history"), report, neg_elbo, run_dir, run_cfg.seed)
    write_page(net, test_set, report, run_dir, run_cfg.seed)
    return run_dir


def resume_run(path, cfg, given):
    """--resume: continue a run from its checkpoint.pt, bit for bit as if it had never stopped; a run
    whose epochs are all done but that has no final report (stopped during it) gets its report."""
    net, ckpt = runs.read_checkpoint(path, torch.device("cpu"))     # moved once the run's device is known
    if "rng" not in ckpt or "optimizer" not in ckpt:
        raise UsageError(f"{path} holds no optimizer or random states (best.pt, a shipped model or "
                         f"an older checkpoint): resume from the run's checkpoint.pt")
    run_dir = Path(path).parent
    if "out_dir" in given and Path(cfg.out_dir).resolve() != run_dir.parent.resolve():
        raise UsageError(f"--out-dir {cfg.out_dir} differs from the resumed run's {run_dir.parent}: a resumed run "
                         f"writes in its own folder; drop --out-dir")
    cfg = saved_config(cfg, given - {"out_dir"}, ckpt, RESUMABLE, "resumed run")
    check_config(cfg)
    done, planned = ckpt["epoch"], ckpt["config"].get("epochs", cfg.epochs)
    reported = "final" in runs.read_json(Path(path).parent / "metrics.json")
    if cfg.epochs < done or (cfg.epochs == done and reported):
        raise UsageError(f"--epochs {cfg.epochs}: the checkpoint has already done {done} epochs; "
                         f"give --epochs more than {done} to train further, or --eval it")
    if cfg.lr_schedule == "cosine" and cfg.epochs != planned:
        raise UsageError(f"--epochs {cfg.epochs}: the cosine schedule of this run was laid out for {planned} "
                         f"epochs and would change under the epochs left; resume with --epochs {planned}, "
                         f"or start a new run")
    device = runs.pick_device(cfg.device, cfg.precision)     # --device as given, else its default (auto)
    sets = data.load_sets(cfg.data_dir, cfg.val_size, cfg.binarize, device)
    return train(cfg.model, cfg, device, sets, Resumed(net.to(device), ckpt, Path(path).parent))


def saved_config(cfg, given, ckpt, may_change, what):
    """The checkpoint's hyperparameters, with the flags in may_change taken from the command line and
    the execution settings from the command line or their defaults; a flag outside may_change that
    differs from the checkpoint is refused (runs.merge_config)."""
    merged = runs.merge_config(ckpt, dataclasses.asdict(Config()), {n: getattr(cfg, n) for n in given & CONFIG_FIELDS},
                               may_change, what, execution=EXECUTION)
    return Config(**merged)


def one_class(digits, cfg, device):
    """--one-class: per digit, a VAE trained on that digit's training images only; the test set
    scored by it, the other digits the anomalies (anomaly.py); metrics.json and roc.png."""
    digits = anomaly.parse_digits(digits)
    cfg = dataclasses.replace(cfg, model="vae", val_size=0, patience=0)
    (x_train, y_train), _, (x_test, y_test) = data.load_sets(cfg.data_dir, 0, cfg.binarize, device)
    x_test, y_test = data.head(x_test, y_test, cfg.max_batches)
    if missing := [d for d in digits if not (y_train == d).any()]:
        raise UsageError(f"the training set holds no image of digit {missing[0]}: choose others with --one-class")
    run_dir = runs.make_run_dir(cfg.out_dir, run_name("anomaly", cfg))
    print(f"one-class VAEs ({cfg.arch}, {cfg.epochs} epochs, binarize {cfg.binarize}) for digits "
          f"{digits} on {device}: writing {run_dir}")
    results = {}
    for d in digits:
        start = time.perf_counter()
        net, history = train_one_class(x_train[y_train == d], cfg, device, run_dir)
        seconds = time.perf_counter() - start
        runs.save_checkpoint(run_dir / f"digit{d}.pt", net, hyperparameters(dataclasses.asdict(cfg)), cfg.epochs, history)
        results[d] = {"train_images": int((y_train == d).sum()), "train_seconds": seconds,
                      "final_train_neg_elbo": history[-1]["train_neg_elbo"],
                      **anomaly.score_digit(net, d, x_test, y_test, cfg.iw_samples, cfg.seed)}
        anomaly.print_digit(d, results[d])
        runs.save_json(anomaly.metrics(dataclasses.asdict(cfg), results), run_dir / "metrics.json")
    anomaly.roc_figure(results, run_dir / "roc.png", f"One-class MNIST: a VAE ({cfg.arch}) per digit, {cfg.epochs} "
                       f"epochs, binarize {cfg.binarize}; anomalies = the 9 other digits of the test set")
    return run_dir


def train_one_class(x, cfg, device, run_dir):
    """A VAE trained on the images x alone (one digit's), by the epoch of train(); no evaluation.
    Ctrl-C, kill or a diverged step stop it with one line that says which digits run_dir holds."""
    torch.manual_seed(cfg.seed)
    net = build_net("vae", cfg, device)
    optimizer = make_optimizer(net, cfg.lr, cfg.adam_eps)
    generator = torch.Generator().manual_seed(cfg.seed)
    labels = torch.zeros(len(x), dtype=torch.long, device=device)       # unused by the VAE
    history = []
    with stopping_one_class(run_dir):
        for epoch in range(1, cfg.epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch, cfg.lr, cfg.lr_schedule, cfg.epochs)
            history.append({"epoch": epoch, **train_epoch(net, optimizer, x, labels, cfg, generator, epoch)})
    return net, history


@contextlib.contextmanager
def stopping_one_class(run_dir):
    """runs.stopping_cleanly for --one-class, whose run folder holds one model per finished digit."""
    done = sorted(int(p.stem.removeprefix("digit")) for p in Path(run_dir).glob("digit*.pt"))
    saved = f"{run_dir} holds the models and scores of digits {done}" if done else "no digit had finished"
    try:
        yield
    except KeyboardInterrupt:
        raise runs.Interrupted(f"interrupted: {saved}") from None
    except runs.Diverged as err:
        raise runs.Diverged(f"{err}; {saved}") from None


def impute(path, cfg, device):
    """--impute: −log p(x_h|x_o) of the binarized test digits given 1, 2, 3 quadrants (imputation.py)."""
    net, ckpt = runs.read_checkpoint(path, device)
    check_binarized_vae(path, ckpt, "--impute")
    if cfg.iw_samples < 1:
        raise UsageError("--impute estimates log-likelihoods: give --iw-samples 1 or more")
    _, _, (x_test, y_test) = data.load_sets(cfg.data_dir, 0, "dynamic", device)
    x_test, y_test = data.head(x_test, y_test, cfg.max_batches)
    run_dir = runs.make_run_dir(cfg.out_dir, run_name("impute", dataclasses.replace(cfg, arch=net.arch)))
    print(f"{path}: −log p(x_h|x_o) of {len(x_test)} binarized test digits, K = {cfg.iw_samples}, "
          f"{imputation.N_CHAINS} chains of {imputation.CHAIN_STEPS} steps, {imputation.FIT_STEPS} fitting "
          f"steps; writing {run_dir}")
    start = time.perf_counter()
    result = imputation.conditional_nll(net, x_test, cfg.iw_samples, cfg.seed)
    report = {"checkpoint": str(path), "config": dataclasses.asdict(cfg),
              **imputation.metrics(result, cfg.iw_samples, len(x_test)), "seconds": time.perf_counter() - start}
    imputation.print_report(report)
    runs.save_json(report, run_dir / "metrics.json")
    imputation.completions_figure(net, x_test, y_test, cfg.seed, run_dir / "completions.png")
    return run_dir


def check_binarized_vae(path, ckpt, mode):
    """--impute and --compress need p(x) of binary images: an unconditional VAE (a CVAE needs each
    image's label) trained on binary pixels (a Bernoulli p(x|z) fitted to grey ones is no such model)."""
    if ckpt["model_args"]["model"] != "vae":
        raise UsageError(f"{path} holds a {ckpt['model_args']['model'].upper()}: {mode} needs an unconditional "
                         f"VAE's p(x) (e.g. checkpoints/vae-mlp-binarized.pt)")
    if (ckpt.get("config") or {}).get("binarize", "none") != "dynamic":
        raise UsageError(f"{path} was trained on grey pixels (--binarize none), so its Bernoulli p(x|z) is no "
                         f"model of binary images: {mode} needs a VAE trained with --binarize dynamic "
                         f"(e.g. checkpoints/vae-mlp-binarized.pt)")


def compress(path, cfg):
    """--compress CKPT: the binarized test set coded into one file by bits-back coding, on the CPU."""
    import bbans            # here, not at the top: its entropy coder (constriction) serves this mode only
    net, ckpt = runs.read_checkpoint(path, torch.device("cpu"))
    check_binarized_vae(path, ckpt, "--compress")
    x_test = bbans.binarized_test_set(cfg.data_dir)
    neg_elbo = evaluate(net, x_test, torch.zeros(len(x_test), dtype=torch.long),
                        (ckpt.get("config") or {}).get("seed", 1))[0]["test_neg_elbo"]
    run_dir = runs.make_run_dir(cfg.out_dir, run_name(f"bbans-vae-{ckpt['model_args']['arch']}"))
    return bbans.compress_command(path, net, x_test, neg_elbo, run_dir)


def decompress(compressed, checkpoint, cfg):
    """--decompress FILE --checkpoint CKPT: the images back, decoded before any folder is made."""
    import bbans
    net, ckpt = runs.read_checkpoint(checkpoint, torch.device("cpu"))
    check_binarized_vae(checkpoint, ckpt, "--decompress")
    x_bits, seconds = bbans.decompress_command(compressed, net)
    run_dir = runs.make_run_dir(cfg.out_dir, run_name("bbans-decompress"))
    bbans.write_decompressed(compressed, checkpoint, x_bits, seconds, run_dir)
    return run_dir


# -------- The command line: flags, their checks, and one line with an exit code for whatever goes wrong ---
CHOICES = {"model": ["vae", "cvae", "both"], "arch": ["mlp", "conv"],
           "activation": ["relu", "tanh"], "lr_schedule": ["constant", "cosine", "iwae"],
           "binarize": ["none", "dynamic"], "precision": ["fp32", "bf16"]}
SEED_RANGE = (0, 2 ** 64 - 1)                      # what torch.manual_seed takes (negatives alias these)
CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}
# The flags of Config each mode reads. Any other one given with the mode is refused, never ignored.
# (--eval and --resume read them all: a flag that differs from the checkpoint's is refused there.)
MODE_READS = {"eval": CONFIG_FIELDS, "resume": CONFIG_FIELDS,
              "compress": {"data_dir", "out_dir"}, "decompress": {"out_dir"},
              "one_class": CONFIG_FIELDS - {"cvae_latent_dim"},
              "impute": {"iw_samples", "seed", "device", "data_dir", "out_dir", "max_batches"}}


def make_parser(with_defaults=True):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=None if with_defaults else argparse.SUPPRESS,
                                     fromfile_prefix_chars="@")
    parser.convert_arg_line_to_args = lambda line: line.split("#", 1)[0].split()    # @configs/*.args, # comments
    for f in dataclasses.fields(Config) + dataclasses.fields(Mode):
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, choices=CHOICES.get(f.name),
                            help=f"{f.metadata['help']} (default: {f.default!r})",
                            **({"default": f.default} if with_defaults else {}))
    parser.error = lambda message: runs.fail(f"{message} (see python main.py --help)")
    return parser


def parse_args(argv=None):
    """(Config, Mode, the names of the fields given on the command line)."""
    args = vars(make_parser().parse_args(argv))
    given = set(vars(make_parser(with_defaults=False).parse_args(argv)))
    cfg = Config(**{k: v for k, v in args.items() if k in CONFIG_FIELDS})
    if cfg.model == "cvae" and "latent_dim" in given:        # --latent-dim: the size of the CVAE's z, stored
        if "cvae_latent_dim" in given and cfg.cvae_latent_dim != cfg.latent_dim:    # where the CVAE's belongs
            raise UsageError(f"--latent-dim {cfg.latent_dim} and --cvae-latent-dim {cfg.cvae_latent_dim} both "
                             f"size the CVAE's z: give one of them")
        cfg = dataclasses.replace(cfg, cvae_latent_dim=cfg.latent_dim, latent_dim=Config.latent_dim)
        given = given - {"latent_dim"} | {"cvae_latent_dim"}
    return cfg, Mode(**{k: v for k, v in args.items() if k not in CONFIG_FIELDS}), given


def check_mode(cfg, mode, given):
    """The one mode asked for (None: train), or a UsageError if two are, or if a flag given with it
    would mean nothing there."""
    chosen = [f.name for f in dataclasses.fields(Mode) if f.name != "checkpoint" and getattr(mode, f.name)]
    if len(chosen) > 1:
        raise UsageError(f"{runs.flag(chosen[0])} and {runs.flag(chosen[1])} exclude each other: give one of them")
    name = chosen[0] if chosen else None
    if bool(mode.checkpoint) != (name == "decompress"):
        raise UsageError("--decompress FILE needs --checkpoint CKPT (the model it was compressed with), "
                         "and --checkpoint serves only --decompress")
    unused = sorted(given & CONFIG_FIELDS - MODE_READS.get(name, CONFIG_FIELDS))
    if unused:
        raise UsageError(f"{runs.flag(unused[0])} means nothing with {runs.flag(name)}, which reads only "
                         f"{', '.join(sorted(map(runs.flag, MODE_READS[name]))) or 'its own flags'}: drop it")
    if name in (None, "one_class"):                        # training: a flag its model would ignore
        if "conv_channels" in given and cfg.arch != "conv":
            raise UsageError("--conv-channels shapes the conv arch only: drop it, or give --arch conv")
        if "cvae_latent_dim" in given and cfg.model == "vae":
            raise UsageError("--cvae-latent-dim sizes a CVAE's z and --model vae trains none: drop it, or give "
                             "--model cvae (or both)")
    if name == "one_class":
        if cfg.model == "cvae":
            raise UsageError("--one-class trains unconditional VAEs (a CVAE would be told the digit): use --model vae")
        for unused in ("val_size", "patience"):            # 0, what one-class does anyway, is accepted
            if unused in given and getattr(cfg, unused):
                raise UsageError(f"{runs.flag(unused)} means nothing with --one-class, which trains on all of each "
                                 f"digit's training images with no validation set: drop it")
    return name


LOWEST = {"epochs": 1, "batch_size": 1, "latent_dim": 1, "cvae_latent_dim": 1, "hidden_layers": 1, "hidden_dim": 0,
          "max_batches": 0, "warmup_epochs": 0, "val_size": 0, "patience": 0, "iw_samples": 0, "beta": 0}


def check_config(cfg):
    for name, lowest in LOWEST.items():
        if not getattr(cfg, name) >= lowest:               # `not >=`: a NaN --beta is refused too
            raise UsageError(f"{runs.flag(name)} must be {'at least 1' if lowest else '0 or more'}, "
                             f"got {getattr(cfg, name)}")
    for name in ("lr", "adam_eps"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"{runs.flag(name)} must be a positive number, got {getattr(cfg, name)}")
    conv_channels(cfg)
    if cfg.patience and not cfg.val_size:
        raise UsageError("--patience needs a validation set: give --val-size a positive value")
    if not SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed must be from {SEED_RANGE[0]} to 2**64 - 1 = {SEED_RANGE[1]}, got {cfg.seed}")


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


def run(cfg, mode, given=frozenset()):
    """The mode asked for, or training; returns the run folders written. Every folder's metrics.json
    ends with the provenance of this process (runs.provenance)."""
    name = check_mode(cfg, mode, given)
    check_config(cfg)
    if name in ("compress", "decompress"):             # on the CPU, whatever --device says
        run_dir = compress(mode.compress, cfg) if mode.compress else decompress(mode.decompress, mode.checkpoint, cfg)
        return [runs.stamp_provenance(run_dir, "cpu")]
    if name == "eval":
        return [evaluate_checkpoint(mode.eval, cfg, given)]
    if name == "resume":
        return [resume_run(mode.resume, cfg, given)]
    device = runs.pick_device(cfg.device, cfg.precision)
    if name == "one_class":
        return [runs.stamp_provenance(one_class(mode.one_class, cfg, device), device)]
    if name == "impute":
        return [runs.stamp_provenance(impute(mode.impute, cfg, device), device)]
    sets = data.load_sets(cfg.data_dir, cfg.val_size, cfg.binarize, device)
    kinds = ["vae", "cvae"] if cfg.model == "both" else [cfg.model]
    return [train(kind, cfg, device, sets) for kind in kinds]


def main(argv=None):
    runs.start_clock(argv)
    with runs.one_line_errors():
        run(*parse_args(argv))


if __name__ == "__main__":
    runs.stop_on_sigterm()
    main()
