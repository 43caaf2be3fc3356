"""The shipped checkpoints hold the weights they were first shipped with (checkpoints/weights.json:
dtype, shape and SHA-256 of each tensor's bytes), in today's format, naming no path of the machine
that trained them; and checkpoints/rewrite.py, which wrote them from the format-1 files, changes
nothing that --eval reads.

    python tests/test_checkpoints.py checkpoints/NEW.pt      # prints the weights.json entry of a new file
"""
import dataclasses
import hashlib
import importlib.util
import json
import sys
from pathlib import PurePosixPath, PureWindowsPath

import pytest
import torch

from conftest import ROOT

import main
import runs

SHIPPED = sorted((ROOT / "checkpoints").glob("*.pt"))
RECORDED = json.loads((ROOT / "checkpoints" / "weights.json").read_text())
# vae-conv-binarized.pt as first shipped: format 1 (no `format` key), its config with the training
# machine's settings and the mode flags of the time, and from before --conv-channels existed
FORMAT_1 = ROOT / "tests" / "fixtures" / "vae-conv-binarized-format1.pt"
CPU = torch.device("cpu")
# checkpoints/rewrite.py, its command line called in this process
_spec = importlib.util.spec_from_file_location("rewrite", ROOT / "checkpoints" / "rewrite.py")
REWRITE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(REWRITE)


def tensor_digest(t):
    """'float32 200x794 <SHA-256 of its bytes>': a tensor's dtype, shape and every bit of its values."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{str(t.dtype).removeprefix('torch.')} {'x'.join(map(str, t.shape))} {hashlib.sha256(raw).hexdigest()}"


def absolute_paths(obj):
    """Every string inside obj (dict keys and values, list and tuple items, at any depth) that is an
    absolute path, POSIX (/work/...), Windows (C:\\...) or home-relative (~/...)."""
    if isinstance(obj, str):
        absolute = PurePosixPath(obj).is_absolute() or PureWindowsPath(obj).is_absolute() or obj.startswith("~")
        return [obj] if absolute else []
    if isinstance(obj, dict):
        return [s for key, value in obj.items() for s in absolute_paths(key) + absolute_paths(value)]
    if isinstance(obj, (list, tuple)):
        return [s for item in obj for s in absolute_paths(item)]
    return []


def test_weights_json_names_every_shipped_checkpoint():
    assert sorted(RECORDED) == [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_checkpoint_holds_the_weights_it_was_shipped_with(path):
    state = torch.load(path, weights_only=True)["model"]
    assert {name: tensor_digest(t) for name, t in state.items()} == RECORDED[path.name]


def test_the_digest_sees_one_flipped_bit():
    t = torch.randn(3, 4)
    flipped = t.clone()
    flipped.view(torch.int32)[1, 2] ^= 1                      # the lowest bit of one float's mantissa
    assert tensor_digest(t) == tensor_digest(t.clone()) != tensor_digest(flipped)
    assert tensor_digest(t) != tensor_digest(t.reshape(4, 3)) != tensor_digest(t.double())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_checkpoint_is_today_format_with_hyperparameters_only(path):
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == runs.CHECKPOINT_FORMAT == 2
    assert set(ckpt) == {"format", "model", "model_args", "config", "epoch", "history"}
    assert set(ckpt["config"]) == set(main.hyperparameters(dataclasses.asdict(main.Config())))
    assert absolute_paths(ckpt) == []


def test_absolute_paths_are_found_at_any_depth():
    old = torch.load(FORMAT_1, weights_only=True)
    old["config"]["out_dir"] = "/work/runs/vae-2400-warmup200"          # as two other format-1 files had it
    old["history"][7]["note"] = ("results", r"C:\runs\x", "~/runs")
    assert absolute_paths(old) == ["/work/runs/vae-2400-warmup200", r"C:\runs\x", "~/runs"]


def test_the_format_1_file_and_the_shipped_one_are_the_same_model(tmp_path):
    """The reader of format 1 and the shipped file give the same tensors, model_args, epoch, history
    and configuration; and rewrite.py turns the format-1 file into the shipped one."""
    old_net, old = runs.read_checkpoint(FORMAT_1, CPU)
    new_net, new = runs.read_checkpoint(ROOT / "checkpoints" / "vae-conv-binarized.pt", CPU)
    assert "format" not in old and {"out_dir", "eval", "resume"} <= set(old["config"])
    assert old["model"].keys() == new["model"].keys() == old_net.state_dict().keys()
    assert all(torch.equal(old["model"][k], new["model"][k]) for k in old["model"])
    assert all(torch.equal(old_net.state_dict()[k], new_net.state_dict()[k]) for k in old["model"])
    assert (old["model_args"], old["epoch"], old["history"]) == (new["model_args"], new["epoch"], new["history"])
    read = [main.saved_config(main.Config(), set(), c, main.EVALUABLE, "checkpoint") for c in (old, new)]
    assert read[0] == read[1] and read[0].conv_channels == "32,64" and read[0].hidden_dim == 256
    runs.rewrite_checkpoint(FORMAT_1, tmp_path / "rewritten.pt", main.hyperparameters(dataclasses.asdict(main.Config())))
    rewritten = torch.load(tmp_path / "rewritten.pt", weights_only=True)
    assert {k: v for k, v in rewritten.items() if k != "model"} == {k: v for k, v in new.items() if k != "model"}
    assert all(torch.equal(rewritten["model"][k], new["model"][k]) for k in new["model"])


def test_rewrite_refuses_a_bad_file_before_writing_any(tmp_path, capsys):
    good = tmp_path / "good.pt"
    good.write_bytes(FORMAT_1.read_bytes())
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as stopped:
        REWRITE.cli([str(good), str(tmp_path / "bad.pt")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "bad.pt is not a usable checkpoint" in err and "Traceback" not in err
    assert good.read_bytes() == FORMAT_1.read_bytes()


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        state = torch.load(arg, weights_only=True)["model"]
        print(json.dumps({PurePosixPath(arg).name: {k: tensor_digest(t) for k, t in state.items()}}, indent=2))
