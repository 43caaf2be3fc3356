"""The pieces of training main.py composes: learning-rate schedules, KL warm-up, dynamic
binarization reaching the model, and the test-set likelihood of a CVAE."""
import math

import pytest
import torch

import losses
import main
import data
import models


def test_iwae_schedule_is_3_to_the_i_epochs_at_lr_times_10_to_the_minus_i_over_7():
    # Burda et al. 2015, §5: stage i (i = 0..7) lasts 3^i epochs; 1 + 3 + ... + 3^7 = 3280
    first_epoch = 1
    for i in range(8):
        last_epoch = first_epoch + 3 ** i - 1
        for epoch in (first_epoch, last_epoch):
            assert main.lr_at(epoch, 1e-3, "iwae", epochs=3280) == pytest.approx(1e-3 * 10 ** (-i / 7))
        first_epoch = last_epoch + 1
    assert first_epoch - 1 == 3280
    # the paper stops there; a longer run keeps the last rate instead of decaying on
    assert main.lr_at(5000, 1e-3, "iwae", epochs=5000) == pytest.approx(1e-3 * 10 ** (-1))


def test_cosine_schedule_starts_at_lr_halves_midway_and_ends_near_zero():
    assert main.lr_at(1, 2e-3, "cosine", epochs=100) == pytest.approx(2e-3)
    assert main.lr_at(51, 2e-3, "cosine", epochs=100) == pytest.approx(1e-3)
    assert main.lr_at(100, 2e-3, "cosine", epochs=100) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 0.99)))
    assert main.lr_at(7, 2e-3, "constant", epochs=100) == 2e-3


def test_kl_warm_up_rises_linearly_from_0_to_beta():
    assert main.kl_weight(0, 10, beta=1.0, warmup_epochs=2) == 0
    assert main.kl_weight(5, 10, beta=1.0, warmup_epochs=2) == pytest.approx(0.25)
    assert main.kl_weight(20, 10, beta=0.5, warmup_epochs=2) == 0.5
    assert main.kl_weight(999, 10, beta=0.5, warmup_epochs=2) == 0.5
    assert main.kl_weight(0, 10, beta=0.5, warmup_epochs=0) == 0.5          # no warm-up: β from the start


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_dynamic_binarization_reaches_the_model_and_is_redrawn_each_epoch(monkeypatch, binarize):
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    seen = []
    real_elbo_terms = main.elbo_terms

    def recording(net, xb, yb, bf16=False):
        seen.append(xb.clone())
        return real_elbo_terms(net, xb, yb, bf16)
    monkeypatch.setattr(main, "elbo_terms", recording)
    torch.manual_seed(0)
    net = models.build_model("vae", "mlp", latent_dim=2, hidden_dim=8)
    cfg = main.Config(batch_size=32, binarize=binarize)
    optimizer = main.make_optimizer(net, cfg.lr, cfg.adam_eps)
    for epoch in (1, 2):         # one batch of the same 32 images per epoch, in order
        main.train_epoch(net, optimizer, x, torch.zeros(32, dtype=torch.long), cfg, None, epoch)
    if binarize == "none":
        assert torch.equal(seen[0], x) and torch.equal(seen[1], x)
    else:
        assert all(((b == 0) | (b == 1)).all() for b in seen)
        assert not torch.equal(seen[0], seen[1])                       # redrawn on every use
        assert abs(seen[0].mean() - x.mean()) < 0.02                   # Bernoulli(pixel): the same mean


def test_cvae_test_nll_pairs_every_importance_sample_with_its_own_images_label():
    """main.iw_nll against the same estimate with the labels paired a second, explicit way:
    losses.iw_log_px hands the decoder z sample-major, (k * n, latent_dim), so row s * n + i is a
    sample for image i; here every block of n rows is decoded with y itself."""
    torch.manual_seed(0)
    net = models.build_model("cvae", "mlp", latent_dim=2, hidden_dim=16).eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 3, 7, 9, 1])
    with torch.no_grad():
        net.decoder[0].weight[:, -10:] *= 100        # make the label matter a lot to p(x|y, z)

    def decode_block_by_block(z):
        return torch.cat([net.decode(block, y) for block in z.split(len(y))])
    with torch.no_grad(), data.seeded(x.device, 5):
        reference = losses.iw_log_px(x, lambda v: net.encode(v, y), decode_block_by_block, 8)
    assert main.iw_nll(net, x, y, k=8, seed=5) == pytest.approx(-reference.mean().item(), rel=1e-6)
    # which would catch a wrong pairing: image-major labels (repeat_interleave) score far apart
    with torch.no_grad(), data.seeded(x.device, 5):
        mispaired = losses.iw_log_px(x, lambda v: net.encode(v, y),
                                     lambda z: net.decode(z, y.repeat_interleave(len(z) // len(y))), 8)
    assert abs(mispaired.mean() - reference.mean()) > 1


def test_vae_sample_refuses_labels_and_log_bernoulli_refuses_an_unbatched_image():
    net = models.build_model("vae", "mlp", latent_dim=2, hidden_dim=8)
    with pytest.raises(ValueError, match="cannot draw a chosen digit"):
        net.sample(3, torch.tensor([7, 7, 7]))
    with pytest.raises(ValueError, match="a batch of n images"):
        losses.log_bernoulli(torch.rand(784), torch.zeros(784))


@pytest.fixture(scope="module")
def trained_vae():
    """(net, test −ELBO before training, x_test, y_test): 320 Adam steps of main.train_epoch on
    synthetic digits (a bar whose height is the label), once for the tests below."""
    from conftest import fake_digits

    def as_tensors(n, seed):
        images, labels = fake_digits(n, seed)
        return torch.tensor(images, dtype=torch.float32).div(255).unsqueeze(1), torch.tensor(labels)
    (x, y), (x_test, y_test) = as_tensors(512, seed=0), as_tensors(256, seed=1)
    torch.manual_seed(0)
    net = models.build_model("vae", "mlp", latent_dim=4, hidden_dim=64)
    cfg = main.Config(batch_size=32, epochs=20, lr=3e-3)
    optimizer = main.make_optimizer(net, cfg.lr, cfg.adam_eps)
    generator = torch.Generator().manual_seed(0)
    before = main.evaluate(net, x_test, y_test, seed=0)[0]
    for epoch in range(1, cfg.epochs + 1):                 # 16 steps an epoch
        main.train_epoch(net, optimizer, x, y, cfg, generator, epoch)
    return net, before, x_test, y_test


def test_training_lowers_the_neg_elbo_of_held_out_images(trained_vae):
    """The trained model's −ELBO on other images of that kind must fall below half its start. A
    flipped sign of the loss (it diverges: the NaN guard stops it) or of β·KL (the KL grows without
    bound) fails here."""
    net, before, x_test, y_test = trained_vae
    after = main.evaluate(net, x_test, y_test, seed=0)[0]
    assert after["test_neg_elbo"] < 0.5 * before["test_neg_elbo"]       # measured: 551 -> 213 nats
    assert 0 < after["test_kl"] < 50                                    # measured: 8 nats


def test_iw_nll_is_at_or_below_the_test_neg_elbo_of_a_trained_model(trained_vae):
    """L_1 ≤ L_K ≤ L_M ≤ log p(x) for K ≤ M [IWAE Thm 1], in expectation: the mean IW NLL of 256
    images (K = 10, 50) is at or below the −ELBO that evaluate reports, lower for the larger K, and
    by no more than a few nats (measured: 213.2 −ELBO, 212.3 at K = 10, 212.2 at K = 50)."""
    net, _, x_test, y_test = trained_vae
    neg_elbo = main.evaluate(net, x_test, y_test, seed=0)[0]["test_neg_elbo"]
    nll_10, nll_50 = (main.iw_nll(net, x_test, y_test, k=k, seed=0) for k in (10, 50))
    assert nll_50 < nll_10 < neg_elbo             # strictly: a K that did not reach the bound would tie
    assert neg_elbo - nll_50 < 10
    # K = 1 is the ELBO again (one z per image, the KL sampled rather than exact): the same within noise
    assert main.iw_nll(net, x_test, y_test, k=1, seed=0) == pytest.approx(neg_elbo, abs=1.0)


# ---------------------------------------------------------------------------------------------
# β and the learning rate as the training loop applies them
# ---------------------------------------------------------------------------------------------
class TwoWeights(torch.nn.Module):
    """A stand-in model with two weights: w[0] scales log p(x|z), w[1] scales the KL (below)."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, 0.7]))


class RecordingOptimizer:
    """Takes no step; notes the gradient each step would have used."""
    def __init__(self, net):
        self.net, self.grads = net, []

    def zero_grad(self, set_to_none=True):
        self.net.w.grad = None

    def step(self):
        self.grads.append(self.net.w.grad.clone())


@pytest.mark.parametrize("beta,warmup_epochs", [(1.0, 0), (0.5, 0), (2.0, 2)])
def test_the_optimizer_sees_minus_log_px_plus_beta_times_kl_with_the_warm_up(monkeypatch, beta, warmup_epochs):
    """With log p(x|z) = −w₀ Σx and KL = w₁ (1 + mean x) per image, the gradient of the loss
    −mean(log p(x|z) − β KL) is (mean Σx, β mean(1 + mean x)): the β of each step (kl_weight, counted
    over the run) can be read off the gradient the optimizer is handed."""
    batches = []

    def linear_terms(net, x, y, bf16=False):
        batches.append(x)
        log_px, kl = -net.w[0] * x.flatten(1).sum(1), net.w[1] * (1 + x.flatten(1).mean(1))
        return log_px - kl, log_px, kl
    monkeypatch.setattr(main, "elbo_terms", linear_terms)
    x = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    net, cfg = TwoWeights(), main.Config(batch_size=8, epochs=3, beta=beta, warmup_epochs=warmup_epochs)
    optimizer = RecordingOptimizer(net)
    for epoch in (1, 2, 3):                                      # 3 steps an epoch
        main.train_epoch(net, optimizer, x, torch.zeros(24, dtype=torch.long), cfg, None, epoch)
    assert len(optimizer.grads) == len(batches) == 9
    betas = []
    for step, (grad, xb) in enumerate(zip(optimizer.grads, batches)):
        step_beta = main.kl_weight(step, 3, beta, warmup_epochs)
        expected = torch.stack([xb.flatten(1).sum(1).mean(), step_beta * (1 + xb.flatten(1).mean(1)).mean()])
        assert torch.allclose(grad, expected, rtol=1e-5), (step, grad, expected)
        betas.append(step_beta)
    if warmup_epochs:    # the warm-up reaches the loss: β rises from 0 over 6 steps, then stays at β
        assert betas == pytest.approx([beta * min(1, s / 6) for s in range(9)])
    else:
        assert betas == [beta] * 9


@pytest.mark.parametrize("schedule,epochs", [("cosine", 4), ("iwae", 5)])      # iwae: epochs 1 | 2-4 | 5
def test_each_epoch_trains_at_the_scheduled_learning_rate(tiny_mnist, tmp_path, monkeypatch, schedule, epochs):
    """main.train must set every parameter group's rate to lr_at(epoch) before the epoch's steps."""
    import viz
    seen, real = [], main.train_epoch

    def recording(net, optimizer, x, y, cfg, generator, epoch):
        seen.append((epoch, [group["lr"] for group in optimizer.param_groups]))
        return real(net, optimizer, x, y, cfg, generator, epoch)
    monkeypatch.setattr(main, "train_epoch", recording)
    monkeypatch.setattr(viz, "draw_run", lambda *args, **kwargs: None)
    monkeypatch.setattr(main, "write_page", lambda *args, **kwargs: None)
    main.main(list(map(str, ["--model", "vae", "--hidden-dim", 16, "--latent-dim", 2, "--lr", 2e-3,
                             "--lr-schedule", schedule, "--epochs", epochs, "--max-batches", 1, "--val-size", 0,
                             "--iw-samples", 0, "--data-dir", tiny_mnist, "--out-dir", tmp_path])))
    assert [epoch for epoch, _ in seen] == list(range(1, epochs + 1))
    for epoch, rates in seen:
        assert rates == [pytest.approx(main.lr_at(epoch, 2e-3, schedule, epochs), rel=1e-12)]
    assert len({rates[0] for _, rates in seen}) == (epochs if schedule == "cosine" else 3)   # it does change


@pytest.mark.parametrize("binarize, warmup", [("none", 0), ("dynamic", 2)])
def test_train_epoch_takes_the_plain_sgvb_steps_bit_for_bit(binarize, warmup):
    """The guard, the sums and the bar around the step change nothing: the weights after train_epoch
    equal those of the six lines of the step written out alone (binarize, ELBO, β, loss, backward, step)."""
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(40, dtype=torch.long)
    cfg = main.Config(batch_size=8, binarize=binarize, warmup_epochs=warmup)
    nets = []
    for plain in (False, True):
        torch.manual_seed(0)
        net = models.build_model("vae", "mlp", latent_dim=3, hidden_dim=16)
        optimizer = main.make_optimizer(net, cfg.lr, cfg.adam_eps)
        generator = torch.Generator().manual_seed(1)
        if plain:
            for step, (xb, yb) in enumerate(main.data.batches(x, y, cfg.batch_size, generator)):
                xb = main.data.binarize_dynamic(xb) if binarize == "dynamic" else xb
                _, log_px, kl = main.elbo_terms(net, xb, yb)
                beta = main.kl_weight(step, 5, cfg.beta, cfg.warmup_epochs)
                optimizer.zero_grad()
                (-(log_px - beta * kl).mean()).backward()
                optimizer.step()
        else:
            main.train_epoch(net, optimizer, x, y, cfg, generator, 1)
        nets.append(net)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
