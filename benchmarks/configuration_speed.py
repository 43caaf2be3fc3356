"""Seconds per training epoch of the model of each published MNIST VAE's recipe (RESULTS.md, 'Five
published MNIST VAEs, reproduced'), on this machine: main.py's own epoch (main.train_epoch) for
`--batches` steps after a warm-up, scaled to a full epoch; the rows one after another, never two at
once. Prints the CPU, the torch version and the thread count first, because these numbers belong
to the machine they ran on.

    python benchmarks/configuration_speed.py                 # 24 s to 3 minutes on 2 cores
    python benchmarks/configuration_speed.py --batches 100   # steadier, slower
    python benchmarks/configuration_speed.py --json records/configuration-speed/run.json

--json also writes each row's timings and this run's provenance (records/configuration-speed/
holds the published one).
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data      # noqa: E402
import main      # noqa: E402
import runs      # noqa: E402

# The training flags of each row's recipe (configs/); evaluation flags change no epoch.
ROWS = {
    "MLP VAE 784-400-20 (the pair's and 'from scratch')": ["--model", "vae"],
    "MLP CVAE, latent 2 (the pair's)": ["--model", "cvae"],
    "conv VAE 32-64-128, 500 dense": ["--model", "vae", "--arch", "conv"],
    "conv VAE 32-64, 256 dense": ["--model", "vae", "--arch", "conv", "--conv-channels", "32,64", "--hidden-dim", "256"],
    "MLP VAE 784-128-64, alpha 0.001": ["--model", "vae", "--hidden-dim", "128", "--latent-dim", "64", "--beta", "0.001"],
}


def seconds_per_epoch(argv, train_set, batches, device):
    """Time `batches` steps of main.train_epoch (after 5 warm-up steps) and scale to one epoch."""
    cfg, _, _ = main.parse_args(argv + ["--max-batches", str(batches)])
    torch.manual_seed(cfg.seed)
    net = main.build_net(cfg.model, cfg, device)
    optimizer = main.make_optimizer(net, cfg.lr, cfg.adam_eps)
    generator = torch.Generator().manual_seed(cfg.seed)
    main.train_epoch(net, optimizer, *train_set, dataclasses.replace(cfg, max_batches=5), generator, 1)
    start = time.perf_counter()
    main.train_epoch(net, optimizer, *train_set, cfg, generator, 2)
    if device.type != "cpu":
        torch.accelerator.synchronize()
    per_step = (time.perf_counter() - start) / batches
    return per_step * data.n_batches(len(train_set[0]), cfg.batch_size)


def benchmark():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40, help="timed steps per row")
    parser.add_argument("--repeats", type=int, default=3, help="timings per row; the median is printed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the timings and this run's provenance here")
    args = parser.parse_args()
    runs.json_target(args.json)
    device = runs.pick_device(args.device)
    train_set, _ = data.load_mnist(data.data_path(main.Config().data_dir), device)
    train_set, _ = data.split_validation(train_set, main.Config().val_size)     # 50,000 images, as main.py
    print(f"{runs.device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}; an epoch = {len(train_set[0])} images, batch 128")
    report = {"batches": args.batches, "repeats": args.repeats, "images_per_epoch": len(train_set[0]), "rows": {}}
    for name, argv in ROWS.items():
        times = [seconds_per_epoch(argv, train_set, args.batches, device) for _ in range(args.repeats)]
        print(f"{name:50s} {statistics.median(times):7.2f} s per epoch (min {min(times):.2f}, max {max(times):.2f})")
        report["rows"][name] = {"flags": argv, "seconds_per_epoch": statistics.median(times), "all": times}
    if args.json:
        runs.save_json({**report, "provenance": runs.provenance(device)}, args.json)


if __name__ == "__main__":
    benchmark()
