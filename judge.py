"""Does the CVAE draw the digit it is asked for? A separately trained classifier is the judge.

For each digit d, samples of p(x|y = d) with z ~ N(0, I) are shown to a small convnet trained on
MNIST (DigitClassifier); the share it labels d is the CVAE's sample accuracy. The judge is
trained once (about a minute on a CPU) and cached beside the data as classifier.pt.
"""
import torch
import torch.nn as nn
from tqdm import tqdm

import data
import models
import runs

CLASSIFIER_EPOCHS = 4


class DigitClassifier(nn.Module):
    """A small convnet that labels MNIST digits: the judge of the CVAE, telling which digit a sample
    of p(x|y) shows. Not part of any VAE. Its test accuracy after train_classifier is in RESULTS.md."""
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),          # (n, 32, 13, 13)
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),         # (n, 64, 5, 5)
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, models.N_CLASSES),
        )

    def forward(self, x):
        return self.net((x - 0.1307) / 0.3081)     # MNIST's pixel mean and std; class logits (n, 10)


def train_classifier(train_set, test_set, seed):
    """The judge: a small convnet trained on MNIST; returns (net, test accuracy)."""
    x, y = train_set
    torch.manual_seed(seed)
    net = DigitClassifier().to(x.device)
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
    correct = sum((net(xb).argmax(1) == yb).sum().item() for xb, yb in data.batches(x, y, data.EVAL_BATCH_SIZE))
    return correct / len(x)


def load_classifier(data_dir, device, seed):
    """(classifier, its test accuracy): the one cached at data_dir/classifier.pt; if absent, trained
    on the 60,000 grey training images and scored on the 10,000 test images, whatever the run."""
    folder = data.data_path(data_dir)
    path = folder / "classifier.pt"
    if path.is_file():
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
            net = DigitClassifier().to(device)
            net.load_state_dict(ckpt["model"])
            return net.eval(), ckpt["test_accuracy"]
        except Exception as err:        # truncated, or another project's file: train a new judge
            print(f"warning: cannot use {path} ({type(err).__name__}); training a new classifier in its place")
    print(f"training the digit classifier that judges the CVAE's samples (once; cached in {path})")
    net, accuracy = train_classifier(*data.load_mnist(folder, device), seed)
    try:
        runs.save_atomic(lambda p: torch.save({"model": net.state_dict(), "test_accuracy": accuracy}, p), path)
    except OSError as err:
        print(f"warning: could not cache the classifier in {path} ({err.strerror}); it is retrained next time")
    return net, accuracy


@torch.no_grad()
def sample_accuracy(net, classifier, seed, n_per_class=100):
    """How often a sample of p(x|y = d), z ~ N(0, I), is labelled d by the classifier, per digit d."""
    device = net.enc_mu.weight.device
    y = torch.arange(net.n_classes, device=device).repeat_interleave(n_per_class)
    with data.seeded(device, seed):
        hits = classifier(net.sample(len(y), y)).argmax(1) == y
    per_digit = hits.view(net.n_classes, n_per_class).double().mean(1)
    return {"overall": hits.double().mean().item(), "per_digit": per_digit.tolist()}


def judged_accuracy(net, data_dir, seed):
    """sample_accuracy of the CVAE net by the judge cached in data_dir (trained there if absent),
    printed on one line, with the judge's own test accuracy beside it."""
    classifier, judge_accuracy = load_classifier(data_dir, net.enc_mu.weight.device, seed)
    accuracy = sample_accuracy(net, classifier, seed)
    print(f"samples labelled as the digit asked for: {100 * accuracy['overall']:.1f}% (per digit "
          f"{' '.join(f'{100 * a:.0f}' for a in accuracy['per_digit'])}; judge's test accuracy "
          f"{100 * judge_accuracy:.2f}%)")
    return {**accuracy, "classifier_test_accuracy": judge_accuracy}
