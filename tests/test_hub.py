"""torch.hub.load(REPO, name, source="local") gives each shipped checkpoint's model, ready to sample."""
import pytest
import torch

import models
from conftest import ROOT

ENTRIES = {"cvae_mlp": "cvae-mlp-default.pt", "cvae_mlp_binarized": "cvae-mlp-binarized.pt",
           "vae_mlp_binarized": "vae-mlp-binarized.pt", "vae_conv_binarized": "vae-conv-binarized.pt"}


def test_every_shipped_checkpoint_has_an_entry():
    shipped = sorted(p.name for p in (ROOT / "checkpoints").glob("*.pt"))
    assert sorted(ENTRIES.values()) == shipped
    import hubconf          # torch.hub.list reads only GitHub repositories; the same filter, here
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entries) == sorted(ENTRIES)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_hub_load_returns_the_trained_model_ready_to_sample(name):
    net = torch.hub.load(str(ROOT), name, source="local")
    assert not net.training
    stored = torch.load(ROOT / "checkpoints" / ENTRIES[name], weights_only=True)["model"]
    assert all(torch.equal(net.state_dict()[k], stored[k]) for k in stored)
    y = torch.arange(10) if isinstance(net, models.CVAE) else None
    torch.manual_seed(0)
    images = net.sample(10, y)
    assert images.shape == (10, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert images.std(0).mean() > 0.01          # ten different digits, not one image ten times
