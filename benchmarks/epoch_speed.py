"""Seconds per training epoch of the MLP VAE: our in-memory batches against the DataLoader +
ToTensor loop of the PyTorch example (pytorch/examples vae/main.py) and most tutorials.

Four runs train the same model (784-400-20) with the same objective, Adam 1e-3, batch 128 and
seed: {the tutorial's DataLoader loop, main.py's own training epoch} x {float32, bfloat16
autocast (main.py --precision bf16)}. Their epochs are interleaved (epoch 1 of each run, then
epoch 2 of each, ...), never two at once, so a slow minute on a shared machine slows all four
alike, and each ratio is taken epoch by epoch against the DataLoader float32 epoch run next to
it. All four are scored by the same test -ELBO code. The way batches reach the model and the
precision differ; and main.py's epoch also runs its NaN guard and progress bar, which the
tutorial loop does not have.

    python benchmarks/epoch_speed.py                 # 10 epochs each, 3 to 13 minutes on 2 cores
    python benchmarks/epoch_speed.py --epochs 2      # quicker, timing only
    python benchmarks/epoch_speed.py --json records/epoch-speed/run.json

--json also writes every epoch's time, the test -ELBOs, the probes and this run's provenance
(records/epoch-speed/ holds the published one).
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data      # noqa: E402
import losses    # noqa: E402
import main      # noqa: E402
import models    # noqa: E402
import runs      # noqa: E402


def train_step(net, optimizer, x, bf16=False):
    elbo, _, _ = main.elbo_terms(net, x, None, bf16=bf16)
    loss = -elbo.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def dataloader_epoch(net, optimizer, loader, device, bf16=False):
    """The tutorial loop: PIL image -> ToTensor per image, collated by a DataLoader."""
    net.train()
    for x, _ in loader:
        train_step(net, optimizer, x.to(device), bf16)


def in_memory_epoch(net, optimizer, train_set, generator, epoch, bf16=False):
    """Ours: main.py's own training epoch (main.train_epoch, NaN guard and progress bar included)
    over one (60000, 1, 28, 28) tensor, batches by shuffled indexing (data.batches)."""
    cfg = main.Config(batch_size=128, precision="bf16" if bf16 else "fp32")
    main.train_epoch(net, optimizer, *train_set, cfg, generator, epoch)


def fresh_model(seed, device):
    torch.manual_seed(seed)
    net = models.build_model("vae", "mlp", latent_dim=20, hidden_dim=400).to(device)
    return net, main.make_optimizer(net, lr=1e-3, eps=1e-8)     # main.py's defaults


def seconds_per_call(call, repeats=200, warmup=20):
    for _ in range(warmup):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def gemm_gflops(product, a, b):
    """GFLOP/s of `product(a, b)` for a (128 x 784) and b (400 x 784): the step's biggest product."""
    return 2 * 128 * 784 * 400 / seconds_per_call(lambda: product(a, b)) / 1e9


def gemm_probe():
    """The speed of one matrix product through each library PyTorch can use on this CPU.

    PyTorch sends float32 products to MKL and bfloat16 ones to oneDNN. MKL chooses its kernels by
    CPU vendor (on AMD it leaves its AVX-512 kernels unused); oneDNN by instruction set. The oneDNN
    float32 figure is for comparison only: no training loop here uses it.
    """
    a, w = torch.randn(128, 784), torch.randn(400, 784)
    mkl = gemm_gflops(lambda a, w: a @ w.t(), a, w)
    onednn = gemm_gflops(lambda a, w: torch._C._nn.mkldnn_linear(a, w, None), a.to_mkldnn(), w.to_mkldnn())
    bf16 = gemm_gflops(lambda a, w: a @ w.t(), a.bfloat16(), w.bfloat16())
    print(f"one 128x784x400 product: float32 via MKL (what training uses) {mkl:.0f} GFLOP/s, "
          f"float32 via oneDNN {onednn:.0f} GFLOP/s, bfloat16 via oneDNN {bf16:.0f} GFLOP/s")
    return {"float32_mkl": mkl, "float32_onednn": onednn, "bfloat16_onednn": bf16}


class HandWrittenBernoulli(torch.autograd.Function):
    """log p(x|z) = Σ_d x_d l_d − softplus(l_d) per image with its gradient written out,
    ∂/∂l_d = x_d − σ(l_d) and ∂/∂x_d = l_d; the forward in losses.log_bernoulli_samples's form
    (x_d − ½) l_d − ½|l_d| + log σ(|l_d|), which avoids softplus's log1p. Once losses.log_bernoulli;
    kept here so that any machine can tell whether it would pay there."""
    @staticmethod
    def forward(ctx, x_logits, x):
        ctx.save_for_backward(x_logits, x)
        return losses.log_bernoulli_samples(x.flatten(1) - 0.5, x_logits.flatten(1))     # (n,)

    @staticmethod
    def backward(ctx, grad_log_px):
        x_logits, x = ctx.saved_tensors
        grad = grad_log_px.view(-1, *[1] * (x_logits.dim() - 1))
        return (x - torch.sigmoid(x_logits)) * grad, x_logits * grad


def bernoulli_probe(calls=300):
    """Forward and backward of log p(x|z) for one batch (128 images): losses.log_bernoulli (the
    library's binary_cross_entropy_with_logits) against the hand-written gradient above; the
    fastest of `calls` interleaved calls each, which a busy machine disturbs least."""
    x = torch.rand(128, 1, 28, 28)
    logits = torch.randn(128, 1, 28, 28, requires_grad=True)
    candidates = {"losses.log_bernoulli (binary_cross_entropy_with_logits)": lambda: losses.log_bernoulli(x, logits),
                  "hand-written gradient": lambda: HandWrittenBernoulli.apply(logits, x)}
    assert torch.allclose(*[log_px() for log_px in candidates.values()], rtol=1e-5)
    best = {name: math.inf for name in candidates}
    for _ in range(calls):
        for name, log_px in candidates.items():
            start = time.perf_counter()
            log_px().sum().backward()
            best[name] = min(best[name], time.perf_counter() - start)
    print("log p(x|z), forward + backward of one batch, fastest of " + f"{calls}: " + ", ".join(
        f"{name} {1e6 * s:.0f} us" for name, s in best.items()))
    return {name: 1e6 * s for name, s in best.items()}


def benchmark():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="also write the timings, test -ELBOs and this run's provenance here")
    args = parser.parse_args()
    runs.json_target(args.json)
    device = torch.device(args.device)
    train_set, test_set = data.load_mnist(args.data_dir, device)
    print(f"MLP VAE 784-400-20, batch 128, Adam 1e-3, {args.epochs} epochs each, seed {args.seed}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    report = {"epochs": args.epochs, "seed": args.seed, "loops": {}}
    if device.type == "cpu":
        report["gemm_gflops"] = gemm_probe()
        report["bernoulli_microseconds"] = bernoulli_probe()

    loader = torch.utils.data.DataLoader(
        datasets.MNIST(args.data_dir, train=True, transform=transforms.ToTensor()),
        batch_size=128, shuffle=True)
    loops = {}                                  # name -> (net, run one epoch)
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        net, optimizer = fresh_model(args.seed, device)
        loops[f"DataLoader + ToTensor, {precision}"] = net, (
            lambda epoch, net=net, optimizer=optimizer, bf16=bf16: dataloader_epoch(net, optimizer, loader, device, bf16))
        net, optimizer = fresh_model(args.seed, device)
        generator = torch.Generator().manual_seed(args.seed)
        loops[f"in-memory (main.train_epoch), {precision}"] = net, (
            lambda epoch, net=net, optimizer=optimizer, generator=generator, bf16=bf16:
            in_memory_epoch(net, optimizer, train_set, generator, epoch, bf16))

    seconds = {name: [] for name in loops}
    for epoch in range(1, args.epochs + 1):
        for name, (_, run_epoch) in loops.items():
            start = time.perf_counter()
            run_epoch(epoch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)

    baseline = "DataLoader + ToTensor, fp32"
    tests = {name: main.evaluate(net, *test_set, args.seed)[0]["test_neg_elbo"] for name, (net, _) in loops.items()}
    print(f"{'':36s} {'median epoch':>12s} {'min':>6s} {'max':>6s}  {'test -ELBO':>10s}  "
          f"time / DataLoader fp32 (median of per-epoch ratios, min-max)")
    for name, times in seconds.items():
        ratios = [t / b for t, b in zip(times, seconds[baseline])]
        print(f"{name:36s} {statistics.median(times):10.2f} s {min(times):6.2f} {max(times):6.2f}  "
              f"{tests[name]:10.2f}  {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}), "
              f"test -ELBO {tests[name] - tests[baseline]:+.2f} nats")
        report["loops"][name] = {
            "seconds": times, "median_seconds": statistics.median(times), "test_neg_elbo": tests[name],
            "ratio_to_dataloader_fp32": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    if args.json:
        runs.save_json({**report, "provenance": runs.provenance(device)}, args.json)


if __name__ == "__main__":
    benchmark()
