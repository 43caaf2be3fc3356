"""MNIST, loaded once into tensors on the training device and served in shuffled batches; the
seeded random draws of evaluation and pictures.

The project ships the four original MNIST files gzip-compressed under data/MNIST/raw/. On
first use they are unpacked beside themselves (and checked against the published md5s), so
that torchvision.datasets.MNIST finds the layout it expects and never downloads. Only when
neither the files nor their .gz are there does torchvision try to download them.

Why not a DataLoader: torchvision's MNIST turns each image into a PIL image and back to a
tensor (ToTensor) on every access, which costs more than the MLP's own forward and backward
pass. Here the whole set is one (n, 1, 28, 28) float tensor and a batch is one index_select.
"""
import contextlib
import gzip
import hashlib
import os
import zlib
from pathlib import Path

import torch
import torchvision

# md5 of each uncompressed file, as published with the data set and checked by torchvision
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


DEFAULT_DATA_DIR = "data"                            # the folder shipped beside this file
PROJECT_DIR = Path(__file__).resolve().parent


def data_path(data_dir):
    """--data-dir as a path: "data" (the default) is the data/ folder beside this file whatever the
    working directory (run from elsewhere it would otherwise try to download MNIST and retrain the
    judge); any other relative path is read from the working directory. Resolved where it is used,
    so configurations keep "data" and a run folder moved to another clone still finds its data."""
    return PROJECT_DIR / data_dir if data_dir == DEFAULT_DATA_DIR else Path(data_dir)


class DataError(Exception):
    """The data cannot be used; the message says what is wrong and how to fix it."""


def raw_dir(data_dir):
    return Path(data_dir) / "MNIST" / "raw"


def md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpack(gz_path, out_path, expected_md5):
    """Decompress gz_path to out_path, atomically, and check the md5 of what came out.

    A damaged .gz and a folder that cannot take the output (read-only, full) get different messages:
    the first is fixed by a good copy of the file, the second by space or permissions. The temporary
    file is named after this process, so two runs unpacking at once do not write into one file."""
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.part")
    try:
        with gzip.open(gz_path, "rb") as src, open_for_writing(tmp) as dst:
            while chunk := read_gzip(src, gz_path):
                write_or_fail(dst, chunk, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if md5(tmp) != expected_md5:
        tmp.unlink()
        raise DataError(f"{gz_path} unpacks to the wrong bytes (md5 mismatch): replace it with a good copy")
    os.replace(tmp, out_path)


def cannot_write(path, err):
    return DataError(f"cannot write {path} ({err.strerror or err}): make {path.parent} writable or free some "
                     f"space, or point --data-dir at a folder that holds the unpacked MNIST/raw/ files")


def open_for_writing(path):
    try:
        return open(path, "wb")
    except OSError as err:
        raise cannot_write(path, err) from None


def read_gzip(src, gz_path):
    """The next chunk of the decompressed file; a DataError if the .gz is damaged."""
    try:
        return src.read(1 << 20)
    except (OSError, EOFError, zlib.error) as err:   # BadGzipFile is an OSError; a cut file: EOFError;
                                                     # a corrupt deflate stream: zlib.error
        raise DataError(f"{gz_path} is not a readable gzip file ({err}): replace it with a good copy") from None


def write_or_fail(dst, chunk, path):
    try:
        dst.write(chunk)
        dst.flush()           # a full disk shows here, not later in close()
    except OSError as err:
        raise cannot_write(path, err) from None


def prepare_mnist(data_dir, download=True):
    """Make sure data_dir/MNIST/raw holds the four uncompressed MNIST files."""
    raw = raw_dir(data_dir)
    for name, expected in MNIST_MD5.items():
        gz = raw / (name + ".gz")
        if not (raw / name).exists() and gz.exists():
            unpack(gz, raw / name, expected)
    missing = [name for name in MNIST_MD5 if not (raw / name).exists()]
    if not missing:
        return
    hint = (f"put the four MNIST files ({', '.join(MNIST_MD5)}, or their .gz) in {raw}/, "
            f"or point --data-dir at a folder that holds MNIST/raw/")
    if not download:
        raise DataError(f"MNIST is missing from {raw} ({', '.join(missing)}): {hint}")
    try:
        torchvision.datasets.MNIST(data_dir, train=True, download=True)
    except Exception as err:   # no network, a mirror down, a full disk: all end the same way
        raise DataError(f"MNIST is missing from {raw} and could not be downloaded "
                        f"({type(err).__name__}): {hint}") from None


def load_split(data_dir, train, device):
    """(x, y): x float (n, 1, 28, 28) in [0, 1], y long (n,), both on `device`."""
    try:
        ds = torchvision.datasets.MNIST(data_dir, train=train, download=False)
        x, y = ds.data, ds.targets
    except Exception as err:   # torchvision's reader fails in several ways on damaged files
        raise DataError(f"cannot read the MNIST files in {raw_dir(data_dir)} ({type(err).__name__}: "
                        f"{err}); they are truncated or corrupt: replace them with good copies") from None
    if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y) or len(x) == 0:
        raise DataError(f"the MNIST files in {raw_dir(data_dir)} hold {tuple(x.shape)} images and "
                        f"{len(y)} labels, not n 28x28 images with n labels: replace them with good copies")
    x = x.to(device).unsqueeze(1).float().div_(255)
    return x, y.to(device).long()


def load_mnist(data_dir, device, download=True):
    """The train and test splits as in-memory tensors on `device`."""
    prepare_mnist(data_dir, download=download)
    return load_split(data_dir, True, device), load_split(data_dir, False, device)


def split_validation(train_set, val_size):
    """(train, val): the last val_size training images become the validation set."""
    x, y = train_set
    if not 0 <= val_size < len(x):
        raise DataError(f"--val-size {val_size} leaves no training images out of {len(x)}: "
                        f"choose a value from 0 to {len(x) - 1}")
    n = len(x) - val_size
    return (x[:n], y[:n]), (x[n:], y[n:])


# Binarized MNIST. A Bernoulli decoder is a likelihood only for pixels in {0, 1}: on grey pixels
# the "log-likelihood" Σ x log σ(l) + (1 − x) log(1 − σ(l)) is a cross-entropy whose maximum is
# below 0 and not a density over grey images, so papers binarize: each pixel of value g becomes 1
# with probability g. Dynamic binarization draws anew every time a training image is used (a
# regulariser, and the protocol of IWAE's Table 1); validation and test images are drawn once,
# with a fixed seed, so every evaluation sees the same bits and test numbers are deterministic.
BINARIZE_SEEDS = {"val": 101, "test": 102}     # independent of --seed: one test set for every run


def binarize_once(x, split):
    """x with each pixel drawn once ~ Bernoulli(pixel), from a fixed seed per split (on the CPU,
    so the bits are the same on every device)."""
    generator = torch.Generator().manual_seed(BINARIZE_SEEDS[split])
    return torch.bernoulli(x.cpu(), generator=generator).to(x.device)


def load_sets(data_dir, val_size, binarize, device):
    """(train, val, test) tensors; with binarize "dynamic", val and test binarized once, here
    (training images are drawn anew in every epoch, by binarize_dynamic)."""
    train_set, test_set = load_mnist(data_path(data_dir), device)
    train_set, val_set = split_validation(train_set, val_size)
    if binarize == "dynamic":
        val_set = (binarize_once(val_set[0], "val"), val_set[1])
        test_set = (binarize_once(test_set[0], "test"), test_set[1])
    return train_set, val_set, test_set


def binarize_dynamic(x):
    """A fresh draw of binary pixels for a training batch, from the global (seeded) random stream."""
    return torch.bernoulli(x)


@contextlib.contextmanager
def seeded(device, seed):
    """Random numbers on `device` start from `seed` inside; outside, the global random state is as
    it was, so seeded evaluation and pictures never shift the training run's random stream."""
    # on CUDA, MPS, XPU, ...: fork that device's stream too; on the CPU only the CPU's
    forked = {"devices": [device], "device_type": device.type} if device.type != "cpu" else {"devices": []}
    with torch.random.fork_rng(**forked):
        torch.manual_seed(seed)
        yield


EVAL_BATCH_SIZE = 1000     # images per forward pass in evaluation and pictures: bounds memory, changes no number


def batches(x, y, batch_size, generator=None, max_batches=0):
    """Yield (x, y) batches; shuffled by `generator` (a seeded CPU torch.Generator) if given.

    max_batches > 0 stops early (smoke runs). The last batch may be smaller.
    """
    n = len(x)
    order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else None
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches and i >= max_batches:
            return
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def first_batches(n, max_batches):
    """How many of n images the first max_batches evaluation batches hold (all n when max_batches is 0)."""
    return min(n, max_batches * EVAL_BATCH_SIZE) if max_batches else n


def head(x, y, max_batches):
    """(x, y) cut to the images of the first max_batches evaluation batches (--max-batches)."""
    n = first_batches(len(x), max_batches)
    return x[:n], y[:n]


def n_batches(n, batch_size, max_batches=0):
    total = -(-n // batch_size)
    return min(total, max_batches) if max_batches else total
