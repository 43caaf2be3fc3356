"""Samples by digit lined up with their digits: judge.sample_accuracy's per-digit shares and
viz.samples_by_class's rows, with a CVAE that draws a known picture for each label and a judge
that reads that picture back."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import bar, painting_cvae
import judge
import viz


def read_bar(x):
    """A judge that reads the digit off the bar: logits = the mean of each digit's bar rows."""
    return torch.stack([x[:, 0, 4 + 2 * d: 6 + 2 * d, 4:24].mean((1, 2)) for d in range(10)], dim=1)


def test_sample_accuracy_is_one_for_every_digit_drawn_as_asked():
    accuracy = judge.sample_accuracy(painting_cvae(), read_bar, seed=0, n_per_class=20)
    assert accuracy == {"overall": 1.0, "per_digit": [1.0] * 10}


def test_sample_accuracy_is_zero_for_a_decoder_that_draws_the_next_digit():
    accuracy = judge.sample_accuracy(painting_cvae(lambda d: (d + 1) % 10), read_bar, seed=0, n_per_class=20)
    assert accuracy == {"overall": 0.0, "per_digit": [0.0] * 10}


def test_sample_accuracy_blames_the_digits_that_are_drawn_wrong():
    swap = {3: 7, 7: 3}                   # only 3 and 7 come out as each other
    accuracy = judge.sample_accuracy(painting_cvae(lambda d: swap.get(d, d)), read_bar, seed=0, n_per_class=20)
    assert accuracy["per_digit"] == [0.0 if d in swap else 1.0 for d in range(10)]
    assert accuracy["overall"] == pytest.approx(0.8)


@pytest.mark.parametrize("n_per_class", [1, 4])
def test_samples_by_class_rows_are_the_digits_0_to_9_in_order(tmp_path, n_per_class):
    viz.samples_by_class(painting_cvae(), tmp_path / "grid.png", n_per_class=n_per_class)
    pixels = torch.tensor(np.asarray(Image.open(tmp_path / "grid.png").convert("L")), dtype=torch.float32) / 255
    assert pixels.shape == (2 + 30 * 10, 2 + 30 * n_per_class)          # 28-pixel cells, 2-pixel padding
    cells = [pixels[2 + 30 * row: 30 + 30 * row, 2 + 30 * col: 30 + 30 * col]
             for row in range(10) for col in range(n_per_class)]
    labels = read_bar(torch.stack(cells)[:, None]).argmax(1)
    assert labels.tolist() == [row for row in range(10) for _ in range(n_per_class)]
    # and each cell is that digit's picture, not merely brightest on its bar
    assert all(torch.allclose(cell, bar([label]), atol=0.01) for cell, label in zip(cells, labels.tolist()))
