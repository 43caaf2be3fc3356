"""Rewrite checkpoints of main.py in today's format (runs.CHECKPOINT_FORMAT), in place: the same
weights bit for bit, model_args, epoch and history; as config, the hyperparameters only, without
the settings of the machine that ran the training (device, paths, --max-batches, --iw-samples):

    python checkpoints/rewrite.py checkpoints/*.pt

The shipped files were written so. tests/test_checkpoints.py checks each one's weights against
checkpoints/weights.json (SHA-256 of every tensor, recorded from the files as first shipped).
"""
import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main  # noqa: E402
import runs  # noqa: E402


def rewrite(paths):
    """Check every file first (one line and exit code 2 for a bad one, nothing written), then
    rewrite each through a temporary file and a rename."""
    defaults = main.hyperparameters(dataclasses.asdict(main.Config()))
    for path in paths:
        runs.read_checkpoint(path, "cpu")
    for path in paths:
        runs.rewrite_checkpoint(path, path, defaults)
        print(f"{path}: format {runs.CHECKPOINT_FORMAT}")


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="checkpoints (.pt) written by main.py")
    with runs.one_line_errors():
        rewrite(parser.parse_args(argv).paths)


if __name__ == "__main__":
    cli()
