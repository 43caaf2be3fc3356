"""The modes of main.py exclude each other, no flag is silently ignored, a refused command writes
nothing; and the shape of the code: imports go one way, no module switches matplotlib's backend."""
import ast
import dataclasses
import math

import pytest
import torch

from conftest import bar, main_in_process, painting_vae, refused, ROOT

import losses
import main
import models
import runs
import viz


def tiny_binarized_vae(path):
    """A VAE checkpoint that --compress, --decompress and --impute accept: trained on binary pixels."""
    torch.manual_seed(0)
    net = models.build_model("vae", "mlp", 3, 8)
    config = dataclasses.asdict(dataclasses.replace(main.Config(), model="vae", binarize="dynamic", latent_dim=3))
    runs.save_checkpoint(path, net, config, 1, [])
    return path


def refused_writing_nothing(capsys, tmp_path, *args):
    """The one-line error of a refused command, after checking it wrote nothing at all."""
    err = refused(capsys, *args, "--out-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()        # no run folder, not even --out-dir itself
    return err


@pytest.mark.parametrize("first,second", [("--eval", "--one-class"), ("--one-class", "--compress"),
                                          ("--eval", "--resume"), ("--impute", "--one-class"),
                                          ("--compress", "--impute"), ("--resume", "--decompress")])
def test_two_modes_are_refused_in_one_line(tmp_path, capsys, first, second):
    ckpt = tiny_binarized_vae(tmp_path / "vae.pt")
    value = {"--one-class": "3"}
    err = refused_writing_nothing(capsys, tmp_path, first, value.get(first, ckpt), second, value.get(second, ckpt))
    modes = [flag for flag in ("--eval", "--resume", "--compress", "--decompress", "--one-class", "--impute")
             if flag in (first, second)]
    assert f"{modes[0]} and {modes[1]} exclude each other" in err


@pytest.mark.parametrize("args,message", [
    (["--compress", "CKPT", "--seed", "3"], "--seed means nothing with --compress"),
    (["--compress", "CKPT", "--iw-samples", "5"], "--iw-samples means nothing with --compress"),
    (["--decompress", "F", "--checkpoint", "CKPT", "--data-dir", "x"], "--data-dir means nothing with --decompress"),
    (["--impute", "CKPT", "--epochs", "3"], "--epochs means nothing with --impute"),
    (["--one-class", "3", "--cvae-latent-dim", "4"], "--cvae-latent-dim means nothing with --one-class"),
    (["--one-class", "3", "--val-size", "100"], "--val-size means nothing with --one-class"),
    (["--one-class", "3", "--model", "cvae"], "--one-class trains unconditional VAEs"),
    (["--decompress", "F"], "--decompress FILE needs --checkpoint CKPT"),
    (["--checkpoint", "CKPT"], "--checkpoint serves only --decompress"),
    (["--model", "cvae", "--latent-dim", "7", "--cvae-latent-dim", "3"], "both size the CVAE's z"),
])
def test_a_flag_the_mode_would_ignore_is_refused(tmp_path, capsys, args, message):
    ckpt = str(tiny_binarized_vae(tmp_path / "vae.pt"))
    assert message in refused_writing_nothing(capsys, tmp_path, *[ckpt if a == "CKPT" else a for a in args])


def test_a_damaged_file_to_decompress_leaves_no_folder(tmp_path, capsys):
    ckpt = tiny_binarized_vae(tmp_path / "vae.pt")
    (tmp_path / "x.bbans").write_bytes(b"VAEBBANS" + bytes(100))
    assert "x.bbans has format version 0" in refused_writing_nothing(capsys, tmp_path, "--decompress", tmp_path / "x.bbans",
                                                     "--checkpoint", ckpt)


def test_one_class_accepts_the_validation_flags_it_would_not_use_only_at_zero():
    cfg, mode, given = main.parse_args(["--one-class", "3", "--val-size", "0", "--patience", "0", "--model", "vae"])
    assert main.check_mode(cfg, mode, given) == "one_class"


@pytest.mark.parametrize("argv,latent", [(["--model", "cvae", "--latent-dim", "7"], 7), (["--model", "cvae"], 2),
                                          (["--model", "cvae", "--cvae-latent-dim", "5"], 5),
                                          (["--model", "cvae", "--latent-dim", "6", "--cvae-latent-dim", "6"], 6)])
def test_latent_dim_given_with_model_cvae_builds_that_cvae(argv, latent):
    cfg, _, _ = main.parse_args(argv)
    assert main.build_net("cvae", cfg, torch.device("cpu")).latent_dim == latent


def test_checkpoints_store_hyperparameters_not_modes(tiny_mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(viz, "draw_run", lambda *args, **kwargs: None)
    monkeypatch.setattr(main, "write_page", lambda *args, **kwargs: None)
    code, _, err = main_in_process(capsys, "--model", "vae", "--epochs", 1, "--max-batches", 1, "--iw-samples", 0,
                                   "--seed", 7, "--val-size", 16, "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 0, err
    (run_dir,) = (tmp_path / "out").iterdir()
    assert "-seed7-" in run_dir.name                                        # the seed in the folder's name
    config = torch.load(run_dir / "checkpoint.pt", weights_only=True)["config"]
    assert set(config) == {f.name for f in dataclasses.fields(main.Config)} - main.EXECUTION   # what was trained
    metrics = runs.read_json(run_dir / "metrics.json")
    assert not [key for row in metrics["epochs"] for key in row if key.startswith("test_")]   # test set: once
    provenance = metrics["provenance"]                       # written by the run itself
    assert provenance["torch"] == torch.__version__ and provenance["device"] == "cpu" and provenance["threads"] >= 1
    assert provenance["device_name"] and "--seed" in provenance["argv"] and provenance["wall_seconds"] > 0
    assert len(provenance["load_average"]) == 3 and min(provenance["load_average"]) >= 0
    assert provenance["started_utc"].endswith("+00:00") and "slurm_job_id" in provenance
    assert len(provenance["commit"] or "0" * 40) == 40
    assert not set(config) & {f.name for f in dataclasses.fields(main.Mode)}


def test_an_old_checkpoint_with_mode_flags_in_its_config_still_evaluates(tiny_mnist, tmp_path, capsys, monkeypatch):
    """Checkpoints of format 1 were written when eval, resume, ... were Config fields."""
    old = ROOT / "tests" / "fixtures" / "vae-conv-binarized-format1.pt"
    ckpt = torch.load(old, weights_only=True)
    assert {"eval", "resume"} <= set(ckpt["config"])
    monkeypatch.setattr(viz, "draw_run", lambda *args, **kwargs: None)
    monkeypatch.setattr(main, "write_page", lambda *args, **kwargs: None)
    code, _, err = main_in_process(capsys, "--eval", old, "--max-batches", 1, "--iw-samples", 0,
                                   "--data-dir", tiny_mnist, "--out-dir", tmp_path / "out")
    assert code == 0, err
    (run_dir,) = (tmp_path / "out").iterdir()
    assert runs.read_json(run_dir / "metrics.json")["eval"]["test_neg_elbo"] > 0


# Every flag this project has spelled, with a value it takes: users' scripts and the documents' commands.
FLAGS = {"--model": "vae", "--arch": "conv", "--latent-dim": "3", "--cvae-latent-dim": "3", "--hidden-dim": "8",
         "--conv-channels": "4,8", "--hidden-layers": "2", "--activation": "tanh", "--epochs": "2",
         "--batch-size": "8", "--lr": "0.01", "--lr-schedule": "iwae", "--adam-eps": "1e-4", "--beta": "0.5",
         "--warmup-epochs": "1", "--precision": "bf16", "--binarize": "dynamic", "--val-size": "8",
         "--patience": "1", "--seed": "3", "--iw-samples": "4", "--device": "cpu", "--data-dir": "d",
         "--out-dir": "o", "--max-batches": "1", "--eval": "c.pt", "--resume": "c.pt", "--compress": "c.pt",
         "--decompress": "f", "--checkpoint": "c.pt", "--one-class": "all", "--impute": "c.pt"}


def test_every_flag_spelled_before_still_parses():
    for flag, value in FLAGS.items():
        cfg, mode, given = main.parse_args([flag, value])
        assert given == {flag[2:].replace("-", "_")}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.args")))
def test_every_recipe_parses_and_passes_the_checks(recipe):
    cfg, mode, given = main.parse_args([f"@{ROOT / 'configs' / recipe}"])
    assert given                                              # a recipe that sets nothing is a typo
    main.check_mode(cfg, mode, given)
    main.check_config(cfg)


# ---------------------------------------------------------------------------------------------
# The NaN guard: every step on the CPU; on an accelerator at the next read of the device
# ---------------------------------------------------------------------------------------------
def poisoned_run(monkeypatch, guard_every, bad_step=1, n_steps=5):
    """Train one epoch of 5 steps whose loss becomes NaN at step bad_step (0-based); returns
    (the Diverged message, the optimizer steps taken)."""
    real = losses.log_bernoulli
    calls = {"n": 0}

    def poisoned(x, x_logits):
        calls["n"] += 1
        return real(x, x_logits) * (math.nan if calls["n"] == bad_step + 1 else 1.0)
    monkeypatch.setattr(losses, "log_bernoulli", poisoned)
    monkeypatch.setattr(main, "GUARD_EVERY", guard_every)
    torch.manual_seed(0)
    net = models.build_model("vae", "mlp", 2, 8)
    optimizer = main.make_optimizer(net, 1e-3, 1e-8)
    steps = []
    real_step = optimizer.step
    optimizer.step = lambda: (steps.append(1), real_step())
    x = torch.rand(8 * n_steps, 1, 28, 28)
    cfg = dataclasses.replace(main.Config(), batch_size=8)
    with pytest.raises(runs.Diverged) as stopped:
        main.train_epoch(net, optimizer, x, torch.zeros(len(x), dtype=torch.long), cfg, torch.Generator(), 1)
    return str(stopped.value), len(steps)


def test_the_nan_guard_stops_before_the_bad_step_on_the_cpu(monkeypatch):
    message, steps = poisoned_run(monkeypatch, {"cpu": 1})
    assert "the loss became nan at epoch 1, batch 2" in message and steps == 1


def test_on_an_accelerator_the_nan_guard_reads_the_device_every_few_steps(monkeypatch):
    """Read every 3 steps, as on an accelerator every SYNC_EVERY: the bad step 2 is taken, the run
    stops before step 3, and the message names the batches between the two reads."""
    message, steps = poisoned_run(monkeypatch, {"cpu": 3})
    assert "at epoch 1, one of batches 1-3" in message and steps == 2


# ---------------------------------------------------------------------------------------------
# The shape of the code
# ---------------------------------------------------------------------------------------------
MODULES = sorted(ROOT.glob("*.py"))


def imports(path, top_level_only=False):
    """The project modules `path` imports (at the top level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_go_one_way_no_module_imports_main_and_there_is_no_cycle():
    """sweep.py, the other script, checks its runs' flags with main.py's own checks; nothing imports it."""
    project = {p.stem for p in MODULES}
    graph = {p.stem: imports(p) & project for p in MODULES}
    assert [m for m, deps in graph.items() if "main" in deps and m not in ("main", "sweep")] == []
    assert [m for m, deps in graph.items() if "sweep" in deps] == []

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph[start])
    assert [m for m in graph if reaches(m, m)] == []


def test_the_pictures_import_neither_the_page_nor_the_run_plumbing():
    assert imports(ROOT / "viz.py") & {"explorer", "runs", "main"} == set()


def test_the_entropy_coder_is_imported_only_where_compression_runs():
    project = {p.stem for p in MODULES}
    loaded, todo = set(), ["main"]
    while todo:                                   # what `import main` loads, module by module
        name = todo.pop()
        loaded.add(name)
        todo += [m for m in imports(ROOT / f"{name}.py", top_level_only=True) & project if m not in loaded]
    assert "bbans" not in loaded
    assert not any("constriction" in imports(ROOT / f"{m}.py", top_level_only=True) for m in loaded)


def test_no_module_switches_matplotlibs_backend_or_writes_json_unsafely():
    for path in MODULES:
        text = path.read_text()
        assert "matplotlib.use(" not in text and "matplotlib.pyplot" not in imports(path), path.name
        assert "write_text(json.dumps" not in text or path.stem == "runs", path.name   # runs.save_json: atomic


def test_no_function_outside_the_tests_is_named_like_a_test():
    for path in [*MODULES, *sorted((ROOT / "benchmarks").glob("*.py"))]:
        names = [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]
        assert not [n for n in names if n.startswith("test_")], path.name


def test_one_class_with_max_batches_scores_the_images_it_keeps_with_their_labels(tiny_mnist, tmp_path, capsys,
                                                                               monkeypatch):
    """--max-batches 2 with evaluation batches of 16: the first 32 test images and their 32 labels.
    The stand-in model paints the 3s' bar, so only images scored with their own labels give an
    AUROC near 1 (the labels rolled by one against the images give about ½)."""
    monkeypatch.setattr(main.data, "EVAL_BATCH_SIZE", 16)
    monkeypatch.setattr(main, "train_one_class", lambda *args: (painting_vae(bar([3])), [{"train_neg_elbo": 0.0}]))
    code, _, err = main_in_process(capsys, "--one-class", "3", "--model", "vae", "--epochs", 1, "--batch-size", 16,
                                   "--iw-samples", 0, "--max-batches", 2, "--data-dir", tiny_mnist,
                                   "--out-dir", tmp_path / "out")
    assert code == 0, err
    (run_dir,) = (tmp_path / "out").iterdir()
    per_digit = runs.read_json(run_dir / "metrics.json")["per_digit"]
    assert set(per_digit) == {"3"}
    assert all(a > 0.99 for a in per_digit["3"]["auroc"].values()), per_digit["3"]["auroc"]


def test_latent_dim_given_with_model_cvae_is_stored_as_the_cvaes(tmp_path, capsys, monkeypatch):
    cfg, _, given = main.parse_args(["--model", "cvae", "--latent-dim", "2"])
    assert (cfg.latent_dim, cfg.cvae_latent_dim) == (main.Config.latent_dim, 2) and "latent_dim" not in given
    # so an evaluation of the CVAE may name its latent size as it was trained (the shipped CVAE: 2)
    monkeypatch.setattr(viz, "draw_run", lambda *args, **kwargs: None)
    monkeypatch.setattr(main, "write_page", lambda *args, **kwargs: None)
    code, _, err = main_in_process(capsys, "--eval", ROOT / "checkpoints" / "cvae-mlp-default.pt", "--model", "cvae",
                                   "--latent-dim", 2, "--max-batches", 1, "--iw-samples", 0, "--out-dir", tmp_path)
    assert code == 0, err
