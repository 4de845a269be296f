"""The real `hydra-kit` CLI in subprocesses: components, fit, validate, resume after SIGKILL, recipe errors."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
import yaml
from support import HYDRA_KIT, REPO, kill_once_written, quick_recipe, run_cli


@pytest.mark.slow
def test_components_lists_first_party_with_distribution(tmp_path):
    result = run_cli("components", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("ssm", "sga", "moe", "workspace", "pkm", "router", "attention", "mlp"):
        assert f"\n│ {name} " in result.stdout or f"│ {name}" in result.stdout
    assert "hydra-kit" in result.stdout and "0.1.0" in result.stdout


@pytest.mark.slow
def test_fit_writes_events_and_checkpoints_then_validate_accepts_them(tmp_path):
    recipe = quick_recipe(tmp_path)
    result = run_cli("fit", "--config", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quick" / "version_0"
    assert f"run directory: {run_dir}" in result.stdout.replace("\n", "")
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists() and list((run_dir / "checkpoints").glob("best-step=*.ckpt"))
    checkpoint = torch.load(last, weights_only=True)  # loads without executing pickled code
    assert checkpoint["global_step"] == 20
    result = run_cli("validate", "--config", str(recipe), "--ckpt_path", str(last), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/acc" in result.stdout


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = ["--trainer.max_steps", "30", "--last_checkpoint.every_n_train_steps", "4"]
    straight = quick_recipe(tmp_path, "straight")
    assert run_cli("fit", "--config", str(straight), *steps, cwd=tmp_path).returncode == 0
    killed = quick_recipe(tmp_path, "killed")
    proc = subprocess.Popen([*HYDRA_KIT, "fit", "--config", str(killed), *steps], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    kill_once_written(proc, last)
    interrupted_at = torch.load(last, weights_only=True)["global_step"]
    assert interrupted_at < 30, "the run finished before it could be killed; the test proves nothing"
    resumed = run_cli("fit", "--config", str(killed), *steps, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    a = torch.load(tmp_path / "runs" / "straight" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 30
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=f"{key} differs after resume")


def _bad_recipe(tmp_path, mutate) -> str:
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    mutate(recipe)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["model"]["components"]["mlp"].update(component="mpl"), r"bad\.yaml: model\.components\.mlp\.component: unknown component 'mpl'.*available:.*mlp \(SwiGLUMLP\)"),
        (lambda r: r["model"]["components"]["mlp"].update(args={"hidden": 3}), r"bad\.yaml: model\.components\.mlp\.args: unknown argument\(s\) 'hidden'.*valid: hidden_mult, multiple_of"),
        (lambda r: r["model"]["components"]["mlp"].update(blocks=[7]), r"bad\.yaml: model\.components\.mlp\.blocks: block index 7 is out of range.*n_blocks=2"),
        (lambda r: r["model"].update(n_layers=3), r"bad\.yaml: model: unknown key\(s\) 'n_layers'; valid:.*n_blocks"),
        (lambda r: r["model"].update(d_model="wide"), r"bad\.yaml: model\.d_model: expected a positive integer, got 'wide'"),
        # Caught while LightningCLI builds the model or sets up the data; the file is still named.
        (lambda r: r["model"]["components"]["sga"]["args"].update(n_heads=3), r"bad\.yaml: model\.components\.sga\.args: building block 1 failed: sga: n_heads=3 must divide d_model=64"),
        (lambda r: r["model"].update(vocab_size=10), r"bad\.yaml: model\.vocab_size is 10 but the data uses 66 token ids; set model\.vocab_size >= 66"),
    ],
)
@pytest.mark.slow
def test_recipe_errors_name_file_key_and_choices(tmp_path, mutate, expected):
    result = run_cli("fit", "--config", _bad_recipe(tmp_path, mutate), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    import re

    assert re.search(expected, " ".join(result.stderr.split())), result.stderr


@pytest.mark.slow
def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  d_model: 64\n   n_blocks: 2\n")
    result = run_cli("fit", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "broken.yaml: line 3" in " ".join(result.stderr.split())


# --------------------------------------------------------------- what a user sees: output, warnings, saved configs
def run_unfiltered(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    """`hydra-kit ARGS` with Python's warnings shown, as a user sees them (run_cli hides them)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["COLUMNS"] = "250"
    return subprocess.run([*HYDRA_KIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 20-step run of the quick recipe with its progress bar, its saved config and checkpoint, then a resume to 30."""
    tmp = tmp_path_factory.mktemp("trained")
    path = quick_recipe(tmp)
    recipe = yaml.safe_load(path.read_text())
    del recipe["trainer"]["enable_progress_bar"]  # the default rich bar, as a user gets it
    path.write_text(yaml.safe_dump(recipe))
    first = run_unfiltered("fit", "--config", str(path), cwd=tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp / "runs" / "quick" / "version_0"
    saved_config, saved_ckpt = tmp / "saved-config.yaml", tmp / "step20.ckpt"
    saved_config.write_text((run_dir / "config.yaml").read_text())  # the resume below rewrites both
    saved_ckpt.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    resumed = run_unfiltered("fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_steps", "30", cwd=tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"tmp": tmp, "recipe": path, "run_dir": run_dir, "first": first, "resumed": resumed, "config": saved_config, "ckpt": saved_ckpt}


@pytest.mark.slow
def test_fit_output_counts_steps_lists_last_ckpt_and_has_no_warning_noise(trained):
    out, err = flat(trained["first"].stdout), trained["first"].stderr
    assert "Training" in out and "20/20" in out
    for noise in ("Epoch 0/-2", "v_num", "Total FLOPs", "GPU available", "TPU available", "litlogger"):
        assert noise not in out + err, noise
    assert "MFLOP/token" in out and "forward FLOPs per token at L=" in out  # the model summary of parameter_report
    assert "final validation (step 20): val/acc = " in out
    # The final accuracy is read against chance and the task's best no-skill shortcut.
    verdict = re.search(r"held-out accuracy (\S+): chance (\S+), best no-skill baseline (\S+) \((.+?)\), (above|not above) it", out)
    assert verdict is not None, out
    accuracy, chance, best = (float(verdict.group(i).rstrip(":,")) for i in (1, 2, 3))
    assert chance <= best and verdict.group(5) == ("above" if accuracy > best else "not above")
    checkpoints = out.split("checkpoints:")[-1]
    assert "best-step=" in checkpoints and "checkpoints/last.ckpt" in checkpoints
    # stderr holds Lightning's two status lines and no warning (a warning names its source file: "...py:123:")
    assert [line for line in err.splitlines() if line.strip()] == ["Seed set to 0", "`Trainer.fit` stopped: `max_steps=20` reached."], err
    # The resumed run's bar continues from step 20 to 30 (it read "30/10": the batch index over the remaining steps).
    out, err = flat(trained["resumed"].stdout), trained["resumed"].stderr
    assert "30/30" in out and "30/10" not in out and "Restored all states" in err
    assert ".py:" not in err, err  # no "checkpoint directory exists" warning for a resume into its own folder


@pytest.mark.slow
def test_saved_config_and_print_config_reproduce_the_run(trained):
    tmp = trained["tmp"]
    again = run_cli("fit", "--config", str(trained["config"]), cwd=tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    run_dir = flat(again.stdout).split("run directory: ")[1].split()[0]
    a = torch.load(trained["ckpt"], weights_only=True)
    b = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    for key, value in a["state_dict"].items():  # same recipe, seed and data: the same weights
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=f"{key} differs in the reproduced run")
    printed = run_cli("fit", "--config", str(trained["recipe"]), "--print_config", cwd=tmp)
    assert printed.returncode == 0 and "Unable to serialize" not in printed.stdout + printed.stderr
    (tmp / "printed.yaml").write_text(printed.stdout)
    result = run_cli("fit", "--config", str(tmp / "printed.yaml"), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]


def test_checkpoint_io_is_atomic_once_whether_or_not_the_recipe_names_it(tmp_path):
    from hydra_kit.checkpoint import AtomicCheckpointIO
    from hydra_kit.config.lightning import HydraCLI

    path = quick_recipe(tmp_path)
    assert isinstance(HydraCLI(args=["--config", str(path)], run=False).trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"]["plugins"] = [{"class_path": "hydra_kit.checkpoint.AtomicCheckpointIO"}]  # as a reloaded config may
    path.write_text(yaml.safe_dump(recipe))
    cli = HydraCLI(args=["--config", str(path)], run=False)  # Lightning refuses a second checkpoint IO plugin
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.slow
def test_checkpoint_of_another_recipe_is_refused_naming_both(trained, capsys, lightning_logs_here, monkeypatch):
    from hydra_kit.cli import main

    tmp = trained["tmp"]
    monkeypatch.chdir(tmp)
    other = quick_recipe(tmp, "other", d_model=32)
    ckpt = trained["run_dir"] / "checkpoints" / "last.ckpt"
    for command in ("validate", "fit"):
        assert main([command, "--config", str(other), "--ckpt_path", str(ckpt)]) == 2
        err = flat(capsys.readouterr().err)
        assert "Traceback" not in err
        assert f"checkpoint {ckpt} was trained with recipe 'quick' (vocab_size 72, d_model 64, n_blocks 2, components mlp, router, sga, ssm)" in err, err
        assert f"but --config {other} builds vocab_size 72, d_model 32" in err and "they differ in d_model:" in err
        assert "use --config runs/quick/version_0/config.yaml (the run's saved recipe)" in err
        assert not (tmp / "runs" / "other").exists()  # refused before anything ran


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit", "--config", "{empty}"], r"empty\.yaml: the recipe is empty"),
        (["validate", "--config", "{recipe}", "--ckpt_path", "{garbage}"], r"checkpoint '.*garbage\.ckpt' is truncated or corrupt, or not a checkpoint"),
        (["fit", "--config", "{recipe}", "--ckpt_path", "{truncated}"], r"checkpoint '.*truncated\.ckpt' is truncated or corrupt"),
        (["generate", "--ckpt_path", "{truncated}", "--prompt", ""], r"generate: --prompt is empty"),
        (["generate", "--ckpt_path", "{garbage}", "--prompt-ids", "1"], r"checkpoint '.*garbage\.ckpt' is truncated or corrupt"),
        (["fit", "--config", "{recipe}", "--trainer.max_steps", "-3"], r"--trainer\.max_steps -3 is negative: give a positive number of steps, or -1"),
        (["fit", "--config", "{recipe}", "--trainer.max_steps", "0"], r"--trainer\.max_steps 0 trains nothing"),
        (["fit", "--config", "{recipe}", "--config", "{binary}"], r"binary\.yaml: not a YAML recipe \(the file is not UTF-8 text\)"),
    ],
    ids=["empty-yaml", "garbage-ckpt", "truncated-ckpt", "empty-prompt", "garbage-ckpt-generate", "negative-steps", "zero-steps", "binary-yaml"],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, lightning_logs_here, argv, expected):
    import re

    from hydra_kit.cli import main

    recipe = quick_recipe(tmp_path)
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    (tmp_path / "garbage.ckpt").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "binary.yaml").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256)))
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, good)
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[:700])
    files = {"recipe": recipe, "empty": tmp_path / "empty.yaml", "garbage": tmp_path / "garbage.ckpt", "truncated": tmp_path / "truncated.ckpt", "binary": tmp_path / "binary.yaml"}
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(expected, flat(err)), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not (tmp_path / "runs").exists()  # nothing ran, no empty run directory


@pytest.mark.parametrize(
    ("option", "suggestion"),
    [(["--trainer.max_step", "5"], "--trainer.max_steps"), (["--trainer.maxsteps", "5"], "--trainer.max_steps"), (["--data.init_args.batch_sise", "4"], "batch_size")],
)
def test_mistyped_option_is_one_line_with_a_suggestion(tmp_path, capsys, lightning_logs_here, option, suggestion):
    from hydra_kit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(quick_recipe(tmp_path)), *option])
    assert exit_info.value.code == 2
    err = flat(capsys.readouterr().err)
    assert err.startswith("error: hydra-kit fit: ") and f"did you mean {suggestion}" in err, err
    assert "usage:" not in err and "(all options: hydra-kit fit --help)" in err
    assert not (tmp_path / "runs").exists()  # `--trainer.max_step 5` is not taken for max_steps


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [({"max_steps": 50, "val_check_interval": 200}, 50), ({"max_steps": 50, "val_check_interval": 200, "accumulate_grad_batches": 2}, 100),
     ({"max_steps": 500, "val_check_interval": 200}, 200), ({"max_steps": -1, "val_check_interval": 200}, 200), ({"max_steps": 50, "val_check_interval": 0.5}, 0.5)],
)
def test_short_runs_validate_before_they_end(trainer, expected):
    from hydra_kit.config.checks import check_step_limits

    check_step_limits(trainer, fitting=True)
    assert trainer["val_check_interval"] == expected


def _imports(path) -> set[str]:
    """The hydra_kit modules a source file imports (lazy imports inside functions too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.startswith("hydra_kit")}


def test_imports_point_down_the_tiers():
    package = REPO / "hydra_kit"

    def module(path) -> str:
        return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")

    files = {module(p): p for p in package.rglob("*.py")}
    commands = ("hydra_kit.commands", "hydra_kit.cli")
    studies = ("hydra_kit.ablate", "hydra_kit.bench", "hydra_kit.experiments", "hydra_kit.inspection")
    config_tier = ("hydra_kit.config", "hydra_kit.reporting", "hydra_kit.errors")
    for name, path in files.items():
        imported = _imports(path)
        if not name.startswith(commands):  # nothing imports the commands tier
            assert not [i for i in imported if i.startswith(commands)], f"{name} imports the commands tier"
        if name.startswith(config_tier):  # the config tier knows no ablation, benchmark or experiment
            assert not [i for i in imported if i.startswith(studies)], f"{name} imports {imported}"
    assert _imports(package / "errors.py") == set()  # the user-error type can be imported from anywhere


def test_recipe_error_lives_in_errors_and_keeps_its_old_import():
    from hydra_kit.errors import RecipeError
    from hydra_kit.recipe import RecipeError as FromRecipe

    assert FromRecipe is RecipeError and issubclass(RecipeError, ValueError)
