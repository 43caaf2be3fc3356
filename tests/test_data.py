"""data.py: unpacking with md5 checks, clear errors, and the in-memory batches."""
import gzip
import shutil
from pathlib import Path

import pytest
import torch

import data
from conftest import make_tiny_mnist


def gzip_raw_files(root):
    """Replace each raw file by its .gz, as the project ships MNIST; returns the md5s of the originals."""
    raw = data.raw_dir(root)
    md5s = {}
    for name in data.MNIST_MD5:
        md5s[name] = data.md5(raw / name)
        with open(raw / name, "rb") as src, gzip.open(raw / (name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        (raw / name).unlink()
    return md5s


def test_shipped_gz_files_are_unpacked_and_checked(tmp_path, monkeypatch):
    root = make_tiny_mnist(tmp_path / "data")
    monkeypatch.setattr(data, "MNIST_MD5", gzip_raw_files(root))
    (x, y), (x_test, y_test) = data.load_mnist(root, torch.device("cpu"), download=False)
    assert x.shape == (96, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= 0 and x.max() == 1 and x_test.shape == (48, 1, 28, 28)
    assert all((data.raw_dir(root) / name).exists() for name in data.MNIST_MD5)


def test_gz_with_wrong_content_is_refused(tmp_path, monkeypatch):
    root = make_tiny_mnist(tmp_path / "data")
    md5s = gzip_raw_files(root)
    md5s["train-images-idx3-ubyte"] = "0" * 32
    monkeypatch.setattr(data, "MNIST_MD5", md5s)
    with pytest.raises(data.DataError, match="md5 mismatch"):
        data.prepare_mnist(root, download=False)
    assert not (data.raw_dir(root) / "train-images-idx3-ubyte").exists()     # no half-checked file left


@pytest.mark.parametrize("damage", ["cut short", "corrupt deflate stream"])
def test_damaged_gz_is_refused(tmp_path, monkeypatch, damage):
    root = make_tiny_mnist(tmp_path / "data")
    monkeypatch.setattr(data, "MNIST_MD5", gzip_raw_files(root))
    gz = data.raw_dir(root) / "train-images-idx3-ubyte.gz"
    raw = gz.read_bytes()
    # a corrupt body makes zlib itself fail (zlib.error, which is not an OSError)
    gz.write_bytes(raw[:20] if damage == "cut short" else raw[:10] + b"\xff" * 40 + raw[50:])
    with pytest.raises(data.DataError, match="not a readable gzip file"):
        data.prepare_mnist(root, download=False)


@pytest.mark.parametrize("failure", ["read-only folder", "full disk"])
def test_a_folder_that_cannot_take_the_unpacked_file_is_not_blamed_on_the_gz(tmp_path, monkeypatch, failure):
    root = make_tiny_mnist(tmp_path / "data")
    monkeypatch.setattr(data, "MNIST_MD5", gzip_raw_files(root))
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):    # only the unpacked output fails
        if str(path).endswith(".part") and "w" in mode:
            if failure == "read-only folder":               # chmod does not stop root, so pretend
                raise PermissionError(13, "Permission denied", str(path))
            return real_open("/dev/full", mode)            # every write: ENOSPC, from the kernel
        return real_open(path, mode, *args, **kwargs)
    if failure == "full disk" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    monkeypatch.setattr(data, "open", failing_open, raising=False)
    with pytest.raises(data.DataError) as err:
        data.prepare_mnist(root, download=False)
    message = str(err.value)
    assert message.startswith("cannot write") and "gzip" not in message and "replace" not in message
    assert ("Permission denied" if failure == "read-only folder" else "No space left") in message
    assert not list(data.raw_dir(root).glob("*.part"))               # nothing half-written left


def test_missing_data_names_the_folder_and_the_files(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.prepare_mnist(tmp_path / "empty", download=False)
    message = str(err.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw") in message
    assert all(name in message for name in data.MNIST_MD5) and "--data-dir" in message


def test_batches_visit_every_image_once_in_a_seeded_order():
    x = torch.arange(10.0).view(10, 1)
    y = torch.arange(10)
    first = list(data.batches(x, y, 4, torch.Generator().manual_seed(3)))
    again = list(data.batches(x, y, 4, torch.Generator().manual_seed(3)))
    assert [len(b[0]) for b in first] == [4, 4, 2]
    seen = torch.cat([b[1] for b in first])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in first)          # x and y stay paired
    assert len(list(data.batches(x, y, 4, max_batches=2))) == 2 == data.n_batches(10, 4, 2)


def test_dynamic_binarization_gives_bits_with_the_pixel_as_mean():
    torch.manual_seed(0)
    x = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).repeat(40_000, 1)
    bits = data.binarize_dynamic(x)
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(bits.mean(0), x[0], atol=0.01)
    assert not torch.equal(bits, data.binarize_dynamic(x))          # a new draw every time


def test_test_set_binarization_is_fixed_whatever_the_global_seed():
    x = torch.rand(100, 1, 28, 28)
    torch.manual_seed(1)
    a = data.binarize_once(x, "test")
    torch.manual_seed(2)
    assert torch.equal(a, data.binarize_once(x, "test"))
    assert not torch.equal(a, data.binarize_once(x, "val"))          # val and test draw independently
    assert abs(a.mean().item() - x.mean().item()) < 0.01


def test_validation_split_is_the_last_images_of_the_training_set():
    x, y = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    (x_train, y_train), (x_val, y_val) = data.split_validation((x, y), 3)
    assert y_train.tolist() == list(range(7)) and y_val.tolist() == [7, 8, 9]
    assert len(data.split_validation((x, y), 0)[1][0]) == 0
    with pytest.raises(data.DataError, match="leaves no training images"):
        data.split_validation((x, y), 10)
