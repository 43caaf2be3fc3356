"""What several test files share: tiny MNIST-format data written by the tests themselves (no network,
no real data needed), models whose answers are known, a 1-d toy model small enough to integrate,
main.py run in this process, and a tiny sweep."""
import contextlib
import math
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models  # noqa: E402


@pytest.fixture(scope="session")
def browser():
    """The system Chromium, headless, driven through Playwright (its own browser download is not
    needed), launched once per test process (each xdist worker is one) and shared by the page tests
    it runs (tests/test_explorer*.py)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium found: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=args)
        yield browser
        browser.close()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' batches and models are small: a second thread gains them nothing, and on a busy
    2-core machine two threads make them several times slower. Runs compared bit for bit with a
    subprocess need one thread anyway (tests/test_cli.py, ONE_THREAD)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_idx(path, array):
    """Write a uint8 array in the IDX format MNIST uses: magic (0, 0, 0x08, ndim), sizes, bytes."""
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())


def fake_digits(n, seed):
    """n 28x28 images whose bright bar position encodes the label, so labels carry information."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28))
    for image, label in zip(images, labels):
        image[4 + 2 * label: 6 + 2 * label, 4:24] = 255
    return images, labels


def make_tiny_mnist(root, n_train=96, n_test=48):
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


@pytest.fixture
def tiny_mnist(tmp_path):
    return make_tiny_mnist(tmp_path / "data")


# A sweep of one-epoch, two-batch runs of a 16-unit MLP VAE (tests/test_sweep.py, tests/test_slurm.py)
TINY_SWEEP = ["--model", "vae", "--epochs", "1", "--max-batches", "2", "--hidden-dim", "16", "--latent-dim", "2",
              "--iw-samples", "2", "--val-size", "16"]


def tiny_sweep_args(data_dir, *more):
    return [*TINY_SWEEP, "--data-dir", str(data_dir), *map(str, more)]


def sweep_in_process(capsys, *args):
    """(exit code, stdout, stderr) of sweep.cli(args)."""
    import sweep
    try:
        code = sweep.cli(list(map(str, args)))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def finished_runs(folder, seeds):
    """The finished run folder of each seed of a sweep's folder."""
    import sweep
    return [sweep.seed_state(folder / f"seed{s}")[1] for s in seeds]


@contextlib.contextmanager
def interrupted_in_epoch(stop):
    """Inside: main.train_epoch raises KeyboardInterrupt, as Ctrl-C or kill's SIGTERM would
    (runs.stop_on_sigterm), when epoch `stop` begins; the epochs before it run as they would."""
    import main
    real = main.train_epoch

    def train_epoch(net, optimizer, x, y, cfg, generator, epoch):
        if epoch == stop:
            raise KeyboardInterrupt
        return real(net, optimizer, x, y, cfg, generator, epoch)
    main.train_epoch = train_epoch
    try:
        yield
    finally:
        main.train_epoch = real


# Models whose answers are known: they paint a fixed picture, whatever x and z
def painting_vae(picture):
    """A real VAE that ignores its input and z: q(z|x) = N(0, I) (so KL = 0) and p(x|z) puts
    logits ±10 on the binary `picture` (28, 28). An image is likely under it if it is that picture."""
    net = models.build_model("vae", "mlp", latent_dim=2, hidden_dim=8)
    with torch.no_grad():
        for p in [*net.enc_mu.parameters(), *net.enc_logvar.parameters(), net.decoder[-2].weight]:
            p.zero_()
        net.decoder[-2].bias.copy_(20 * picture.flatten() - 10)
    return net.eval()


def bar(digits):
    """The picture of conftest.fake_digits's bars (rows 4 + 2d, 5 + 2d) for each of `digits`."""
    picture = torch.zeros(28, 28)
    for d in digits:
        picture[4 + 2 * d: 6 + 2 * d, 4:24] = 1
    return picture


def painting_cvae(paint=lambda d: d):
    """A real CVAE whose p(x|y, z) draws bar([paint(y)]) whatever z: the decoder's hidden layer is the
    one-hot label (z's weights zero), and its output logits are ±10 on that label's picture."""
    net = models.build_model("cvae", "mlp", latent_dim=2, hidden_dim=10)
    first, last = net.decoder[0], net.decoder[-2]
    with torch.no_grad():
        first.weight.zero_(), first.bias.zero_(), last.bias.zero_()
        first.weight[:, 2:] = torch.eye(10)                     # h = relu(one-hot(y))
        for d in range(10):
            last.weight[:, d] = 20 * bar([paint(d)]).flatten() - 10
    return net.eval()


# A model small enough to integrate (tests/test_iw.py, test_imputation.py): z ~ N(0, 1) in one
# dimension and 4 pixels, p(x_d|z) = Bernoulli(σ(a_d z + b_d)); log p(x) is a 1-d integral.
TOY_A = torch.tensor([2.0, -1.5, 0.5, 1.0])
TOY_B = torch.tensor([0.3, 0.0, -0.7, 0.2])
GRID = torch.linspace(-12, 12, 24001, dtype=torch.float64)
DZ = (GRID[1] - GRID[0]).item()


def log_joint_on_grid(x, pixels=slice(None), logits_bias=TOY_B):
    """log p(x_pixels, z) = Σ_{d in pixels} log p(x_d|z) + log p(z) at every grid point z, in float64."""
    logits = GRID[:, None] * TOY_A.double() + logits_bias.double()
    return Bernoulli(logits=logits[:, pixels]).log_prob(x[pixels].double()).sum(1) + Normal(0.0, 1.0).log_prob(GRID)


def exact_log_p(x, pixels=slice(None), logits_bias=TOY_B):
    """log ∫ Π_{d in pixels} p(x_d|z) p(z) dz on the grid: log p(x), or log p(x_o) for some pixels."""
    return (torch.logsumexp(log_joint_on_grid(x, pixels, logits_bias), 0) + math.log(DZ)).item()


def main_in_process(capsys, *args):
    """(exit code, stdout, stderr) of main.main(args)."""
    import main
    try:
        main.main(list(map(str, args)))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args):
    """The one-line error of a command main.py refuses with exit code 2 (no traceback)."""
    code, _, err = main_in_process(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err
