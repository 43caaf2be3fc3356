"""Train, evaluate and draw a VAE [AEVB] and a label-conditional VAE [M2, CVAE] on MNIST.

    python main.py                          # the MLP VAE, then the MLP CVAE, 10 epochs each
    python main.py --arch conv --model cvae # any field below is a flag: --latent-dim 2, ...
    python main.py --eval results/RUN/checkpoint.pt   # re-evaluate and redraw, no training

Each run writes checkpoint.pt, metrics.json and its pictures into a new folder under --out-dir.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data
import losses
import models
import viz


# ------------------------------------------------------------------------------------------------
# Hyperparameters: the one source of truth. Every field is also a flag (latent_dim -> --latent-dim).
# Defaults are the PyTorch example's protocol (784-400-20, Adam 1e-3, batch 128, 10 epochs, seed 1).
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    model: str = field(default="both", metadata={"help": "vae, cvae, or both (the VAE, then the CVAE)"})
    arch: str = field(default="mlp", metadata={"help": "mlp (784-400-20) or conv (32-64-128 channels, 500 dense)"})
    epochs: int = field(default=10, metadata={"help": "passes over the 60,000 training images"})
    batch_size: int = field(default=128, metadata={"help": "images per Adam step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    latent_dim: int = field(default=20, metadata={"help": "size of the VAE's z"})
    cvae_latent_dim: int = field(default=2, metadata={"help": "size of the CVAE's z: small, so z holds the style "
                                                      "and y the class (README, 'Does the CVAE draw the digit asked for?')"})
    hidden_dim: int = field(default=0, metadata={"help": "hidden units; 0 = the arch's default (mlp 400, conv 500)"})
    beta: float = field(default=1.0, metadata={"help": "weight of the KL term in training; 1 = the true ELBO"})
    seed: int = field(default=1, metadata={"help": "seeds initialisation, shuffling, z samples and pictures"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu or cuda"})
    data_dir: str = field(default="data", metadata={"help": "folder holding MNIST/raw/ (shipped in data/)"})
    out_dir: str = field(default="results", metadata={"help": "each run writes a new folder in here"})
    max_batches: int = field(default=0, metadata={"help": "stop each epoch after this many batches (smoke runs); 0 = all"})
    eval: str = field(default="", metadata={"help": "path to a checkpoint.pt: evaluate and draw it, no training"})


CHOICES = {"model": ["vae", "cvae", "both"], "arch": ["mlp", "conv"], "device": ["auto", "cpu", "cuda"]}
EVAL_BATCH_SIZE = 1000        # test-set batches; large is faster and changes no number


class UsageError(Exception):
    """Bad input from the user: main() prints the message on one line and exits with code 2."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type,
                            default=f.default, choices=CHOICES.get(f.name),
                            help=f"{f.metadata['help']} (default: {f.default!r})")
    parser.error = lambda message: fail(f"{message} (see python main.py --help)")
    return Config(**vars(parser.parse_args(argv)))


def check_config(cfg):
    for name in ("epochs", "batch_size", "latent_dim", "cvae_latent_dim"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("hidden_dim", "max_batches"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if not cfg.beta >= 0:
        raise UsageError(f"--beta must be 0 or more, got {cfg.beta}")


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available: use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def save_atomic(write, path):
    """Write through a temporary file and rename it, so a crash never leaves half a file at `path`."""
    tmp = Path(str(path) + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_json(obj, path):
    save_atomic(lambda p: p.write_text(json.dumps(obj, indent=2)), path)


# ------------------------------------------------------------------------------------------------
# The objective, one training epoch, and the test-set evaluation
# ------------------------------------------------------------------------------------------------
def elbo_terms(net, x, y):
    """(elbo, log_px, kl) per image, one z ~ q sampled per image: AEVB Eq. 10, or its conditional form."""
    if isinstance(net, models.CVAE):
        x_logits, mu, logvar = net(x, y)                 # q(z|x, y), p(x|y, z)
        return losses.conditional_elbo(x, x_logits, mu, logvar)
    x_logits, mu, logvar = net(x)                        # q(z|x), p(x|z)
    return losses.elbo(x, x_logits, mu, logvar)


def make_optimizer(net, lr):
    """Adam; the fused kernel updates all parameters in one call (about 10% of a CPU epoch saved)."""
    return torch.optim.Adam(net.parameters(), lr=lr, fused=True)


def train_epoch(net, optimizer, x, y, cfg, generator, desc):
    """One pass over (x, y); returns the mean −ELBO (beta = 1) over the epoch's images, in nats."""
    net.train()
    total, count = torch.zeros((), device=x.device), 0
    bar = tqdm(data.batches(x, y, cfg.batch_size, generator, cfg.max_batches),
               total=data.n_batches(len(x), cfg.batch_size, cfg.max_batches), desc=desc, leave=False)
    for step, (xb, yb) in enumerate(bar):
        elbo, log_px, kl = elbo_terms(net, xb, yb)
        loss = -(log_px - cfg.beta * kl).mean()          # beta = 1: the negated ELBO, per image
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += elbo.detach().sum().neg()
        count += len(xb)
        if step % 50 == 0:
            bar.set_postfix_str(f"-ELBO {-elbo.mean().item():.1f}", refresh=False)
    return total.item() / count


@torch.no_grad()
def evaluate(net, x, y, seed, max_batches=0):
    """Test −ELBO and its two terms, nats per image; z sampled once per image, seeded."""
    net.eval()
    sums = torch.zeros(3, device=x.device)
    count = 0
    with models.seeded(x.device, seed):
        for xb, yb in data.batches(x, y, EVAL_BATCH_SIZE, max_batches=max_batches):
            elbo, log_px, kl = elbo_terms(net, xb, yb)
            sums += torch.stack([-elbo.sum(), -log_px.sum(), kl.sum()])
            count += len(xb)
    neg_elbo, recon, kl = (sums / count).tolist()
    return {"test_neg_elbo": neg_elbo, "test_recon": recon, "test_kl": kl}


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


def load_classifier(data_dir, train_set, test_set, seed):
    """The classifier cached at data_dir/classifier.pt, trained (about a minute on a CPU) if absent."""
    path = Path(data_dir) / "classifier.pt"
    device = train_set[0].device
    if path.is_file():
        ckpt = torch.load(path, map_location=device, weights_only=True)
        net = models.DigitClassifier().to(device)
        net.load_state_dict(ckpt["model"])
        return net.eval(), ckpt["test_accuracy"]
    print(f"training the digit classifier that judges the CVAE's samples (once; cached in {path})")
    net, accuracy = train_classifier(train_set, test_set, seed)
    save_atomic(lambda p: torch.save({"model": net.state_dict(), "test_accuracy": accuracy}, p), path)
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
# Pictures, checkpoints, and the two ways in: train a model, or evaluate a checkpoint
# ------------------------------------------------------------------------------------------------
def draw(net, test, history, run_dir, seed, title):
    x_test, y_test = test
    net.eval()
    viz.reconstruction_grid(net, x_test, y_test, run_dir / "reconstructions.png")
    viz.sample_grid(net, run_dir / "samples.png", seed=seed)
    if isinstance(net, models.CVAE):
        viz.samples_by_class(net, run_dir / "samples_by_class.png", seed=seed)
    if history:
        viz.loss_curves(history, run_dir / "loss_curves.png", title)


def save_checkpoint(net, optimizer, cfg, epoch, history, path):
    ckpt = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "model_args": models.model_args(net), "config": dataclasses.asdict(cfg),
            "epoch": epoch, "history": history}
    save_atomic(lambda p: torch.save(ckpt, p), path)


def train(kind, cfg, device, train_set, test_set):
    """Train one model (kind 'vae' or 'cvae') and write its run folder; returns the folder."""
    torch.manual_seed(cfg.seed)
    latent_dim = cfg.cvae_latent_dim if kind == "cvae" else cfg.latent_dim
    net = models.build_model(kind, cfg.arch, latent_dim, cfg.hidden_dim).to(device)
    optimizer = make_optimizer(net, cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)          # the shuffling order
    run_dir = make_run_dir(cfg.out_dir, f"{kind}-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_cfg = dataclasses.replace(cfg, model=kind)
    print(f"{kind.upper()} ({cfg.arch}, latent {latent_dim}) on {device}: writing {run_dir}")
    history = []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        train_neg_elbo = train_epoch(net, optimizer, *train_set, cfg, generator, f"epoch {epoch}/{cfg.epochs}")
        seconds = time.perf_counter() - start
        row = {"epoch": epoch, "train_neg_elbo": train_neg_elbo,
               **evaluate(net, *test_set, cfg.seed, cfg.max_batches), "train_seconds": seconds}
        history.append(row)
        print(f"epoch {epoch:3d}  train -ELBO {train_neg_elbo:8.2f}  test -ELBO {row['test_neg_elbo']:8.2f}"
              f"  = recon {row['test_recon']:7.2f} + KL {row['test_kl']:6.2f}   ({seconds:.1f} s)")
        save_checkpoint(net, optimizer, run_cfg, epoch, history, run_dir / "checkpoint.pt")
        save_json({"config": dataclasses.asdict(run_cfg), "model_args": models.model_args(net),
                   "epochs": history}, run_dir / "metrics.json")
    draw(net, test_set, history, run_dir, cfg.seed, f"{kind.upper()} ({cfg.arch}), MNIST")
    if kind == "cvae" and not cfg.max_batches:     # a smoke run's data would make a poor judge
        report_sample_accuracy(net, cfg, train_set, test_set, run_dir / "metrics.json")
    return run_dir


def report_sample_accuracy(net, cfg, train_set, test_set, metrics_path):
    """Add to metrics.json how often the CVAE's samples of digit d are labelled d by the classifier."""
    classifier, judge_accuracy = load_classifier(cfg.data_dir, train_set, test_set, cfg.seed)
    accuracy = sample_accuracy(net, classifier, cfg.seed)
    print(f"samples labelled as the digit asked for: {100 * accuracy['overall']:.1f}% (per digit "
          f"{' '.join(f'{100 * a:.0f}' for a in accuracy['per_digit'])}; judge's test accuracy "
          f"{100 * judge_accuracy:.2f}%)")
    metrics = json.loads(metrics_path.read_text())
    metrics["sample_accuracy"] = {**accuracy, "classifier_test_accuracy": judge_accuracy}
    save_json(metrics, metrics_path)


def load_for_eval(path, device):
    if not Path(path).is_file():
        raise UsageError(f"no checkpoint at {path}: pass the path of a checkpoint.pt written by main.py")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        net = models.build_model(**ckpt["model_args"]).to(device)
        net.load_state_dict(ckpt["model"])
    except Exception as err:
        raise UsageError(f"{path} is not a usable checkpoint of this project "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return net.eval(), ckpt


def evaluate_checkpoint(cfg, net, ckpt, test_set):
    """--eval: test metrics and pictures of a saved model, in a new run folder."""
    args = ckpt["model_args"]
    run_dir = make_run_dir(cfg.out_dir, f"eval-{args['model']}-{args['arch']}-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics = evaluate(net, *test_set, cfg.seed, cfg.max_batches)
    print(f"{cfg.eval} (epoch {ckpt.get('epoch')}): test -ELBO {metrics['test_neg_elbo']:.2f} = recon "
          f"{metrics['test_recon']:.2f} + KL {metrics['test_kl']:.2f}; writing {run_dir}")
    save_json({"checkpoint": str(cfg.eval), "config": ckpt.get("config"), "model_args": args,
               "eval": metrics, "epochs": ckpt.get("history", [])}, run_dir / "metrics.json")
    draw(net, test_set, ckpt.get("history"), run_dir, cfg.seed, f"{args['model'].upper()} ({args['arch']}), MNIST")
    return run_dir


def run(cfg):
    check_config(cfg)
    device = pick_device(cfg.device)
    if cfg.eval:
        net, ckpt = load_for_eval(cfg.eval, device)     # refuse a bad checkpoint before loading data
        _, test_set = data.load_mnist(cfg.data_dir, device)
        return [evaluate_checkpoint(cfg, net, ckpt, test_set)]
    train_set, test_set = data.load_mnist(cfg.data_dir, device)
    kinds = ["vae", "cvae"] if cfg.model == "both" else [cfg.model]
    return [train(kind, cfg, device, train_set, test_set) for kind in kinds]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (UsageError, data.DataError) as err:
        fail(str(err))


if __name__ == "__main__":
    main()
