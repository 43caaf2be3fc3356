"""Seconds per training epoch of the MLP VAE: our in-memory batches against the DataLoader +
ToTensor loop of the PyTorch example (pytorch/examples vae/main.py) and most tutorials.

Both loops train the same model (784-400-20) with the same objective, Adam 1e-3, batch 128 and
seed, for the same number of epochs, one after the other in this process (never two at once),
and both are scored by the same test -ELBO code. Only the way batches reach the model differs.

    python benchmarks/epoch_speed.py                 # 10 epochs each, about 3 minutes on 2 cores
    python benchmarks/epoch_speed.py --epochs 2      # quicker, timing only
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data      # noqa: E402
import main      # noqa: E402
import models    # noqa: E402


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


def in_memory_epoch(net, optimizer, x_train, generator, bf16=False):
    """Ours: one (60000, 1, 28, 28) tensor, batches by shuffled indexing (data.batches)."""
    net.train()
    for x, _ in data.batches(x_train, x_train, 128, generator):
        train_step(net, optimizer, x, bf16)


def measure(name, epochs, run_epoch, net, test_set, seed):
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        run_epoch()
        seconds.append(time.perf_counter() - start)
    test = main.evaluate(net, *test_set, seed)["test_neg_elbo"]
    print(f"{name:28s} median epoch {statistics.median(seconds):6.2f} s  "
          f"(min {min(seconds):.2f}, max {max(seconds):.2f})   test -ELBO after {epochs} epochs {test:.2f}")
    return statistics.median(seconds), test


def fresh_model(seed, device):
    torch.manual_seed(seed)
    net = models.build_model("vae", "mlp", latent_dim=20, hidden_dim=400).to(device)
    return net, main.make_optimizer(net, main.Config())     # Adam, lr 1e-3, the default eps


def main_():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / "data"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    train_set, test_set = data.load_mnist(args.data_dir, device)
    print(f"MLP VAE 784-400-20, batch 128, Adam 1e-3, {args.epochs} epochs each, seed {args.seed}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    loader = torch.utils.data.DataLoader(
        datasets.MNIST(args.data_dir, train=True, transform=transforms.ToTensor()),
        batch_size=128, shuffle=True)
    results = {}
    for precision in ("fp32", "bf16"):          # bf16: main.py --precision bf16 (autocast)
        bf16 = precision == "bf16"
        net, optimizer = fresh_model(args.seed, device)
        torch.manual_seed(args.seed)
        results["loader", precision] = measure(
            f"DataLoader + ToTensor, {precision}", args.epochs,
            lambda: dataloader_epoch(net, optimizer, loader, device, bf16), net, test_set, args.seed)
        net, optimizer = fresh_model(args.seed, device)
        generator = torch.Generator().manual_seed(args.seed)
        results["ours", precision] = measure(
            f"in-memory (data.batches), {precision}", args.epochs,
            lambda: in_memory_epoch(net, optimizer, train_set[0], generator, bf16), net, test_set, args.seed)
    slow, slow_test = results["loader", "fp32"]
    for key, name in ((("ours", "fp32"), "in-memory, fp32"), (("ours", "bf16"), "in-memory, bf16"),
                      (("loader", "bf16"), "DataLoader, bf16")):
        fast, fast_test = results[key]
        print(f"{name:17s} / DataLoader, fp32: {fast / slow:.2f}x the time per epoch "
              f"({slow / fast:.1f}x faster); test -ELBO difference {fast_test - slow_test:+.2f} nats")

if __name__ == "__main__":
    main_()
