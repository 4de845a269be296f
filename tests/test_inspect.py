"""`hydra-kit inspect` on a checkpoint trained for a few steps: the tables, the PNG and the bad-input errors."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from support import quick_recipe

from hydra_kit.cli import main


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quick recipe (SSM, SGA in block 1, router, MLP; MQAR with 4 pairs) trained for 3 steps by `hydra-kit fit`."""
    tmp = tmp_path_factory.mktemp("inspect")
    recipe = quick_recipe(tmp)
    steps = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--diagnostics.every_n_steps", "0"]
    assert main(["fit", "--config", str(recipe), *steps]) == 0
    return {"tmp": tmp, "ckpt": tmp / "runs" / "quick" / "version_0" / "checkpoints" / "last.ckpt"}


@pytest.mark.slow
def test_inspect_prints_per_block_table_and_evidence_and_writes_png(trained, capsys):
    png = trained["tmp"] / "out" / "inspect.png"
    assert main(["inspect", "--ckpt_path", str(trained["ckpt"]), "--examples", "8", "--out", str(png)]) == 0
    out = flat(capsys.readouterr().out)
    # The task the run was trained on, from its saved config.yaml, and its held-out split.
    assert "8 held-out examples of MQAR(num_pairs=4, num_queries=4) (seed 0)" in out
    assert re.search(r"accuracy at the answer positions \d\.\d{3}", out)
    for block, instance in ((0, "ssm"), (0, "mlp"), (1, "ssm"), (1, "mlp"), (1, "sga")):
        assert re.search(rf"│ {block} │ {instance} +│", out), (block, instance)
    assert "│ router" not in out  # its gates are the gate column
    assert re.search(r"│ 1 │ sga +│ +0\.\d{3} │ +\d\.\d{3} │ +\d+\.\d{3} │ global_salience=\d\.\d{3}, global_attn_share=\d\.\d{3}", out), out
    assert re.search(r"│ 0 │ ssm +│ +- │", out)  # the SSM is not gated
    # MQAR says where each query's key-value pair is: 8 examples x 4 queries answered by the SGA block.
    assert re.search(r"│ 1 │ sga +│ +32 │ +\d\.\d{3} │ .*│ +\d\.\d{3} │ +\d\.\d{3} │", out), out
    assert f"wrote {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_names_a_task_and_a_component(trained, capsys):
    args = ["inspect", "--ckpt_path", str(trained["ckpt"]), "--examples", "4", "--out", str(trained["tmp"] / "x.png")]
    assert main([*args, "--task", "mqar", "--task_args", '{"num_pairs": 6, "num_queries": 2}', "--component", "sga", "--seed", "3"]) == 0
    out = flat(capsys.readouterr().out)
    assert "4 held-out examples of MQAR(num_pairs=6, num_queries=2) (seed 3)" in out
    assert "│ 1 │ sga" in out and "│ 0 │ ssm" not in out and "│ 0 │ mlp" not in out
    assert re.search(r"│ 1 │ sga +│ +8 │", out)  # 4 examples x 2 queries
    # A task that does not say where its answers' facts are: the per-block table only.
    assert main([*args, "--task", "logic-chains"]) == 0
    out = flat(capsys.readouterr().out)
    assert "│ 1 │ sga" in out and re.search(r"LogicChains\(.*\) does not say where each answer's fact is stated", out)


def test_inspect_without_the_run_config_defaults_to_the_checkpoint_folder_png(trained, capsys, tmp_path):
    lone = tmp_path / "lone.ckpt"
    shutil.copy(trained["ckpt"], lone)
    assert main(["inspect", "--ckpt_path", str(lone), "--task", "mqar", "--task_args", '{"num_pairs": 4, "num_queries": 4}', "--examples", "2"]) == 0
    assert (tmp_path / "lone-inspect.png").is_file()
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--ckpt_path", "{missing}"], r"checkpoint '.*missing\.ckpt' does not exist"),
        (["--ckpt_path", "{garbage}"], r"checkpoint '.*garbage\.ckpt' is truncated or corrupt, or not a checkpoint"),
        (["--ckpt_path", "{foreign}"], r"checkpoint '.*foreign\.ckpt' is not a hydra-kit checkpoint"),
        (["--ckpt_path", "{ckpt}", "--task", "distant-premise"], r"inspect: task DistantPremise\(.*\) uses 83 token ids but the model reads only 72 \(vocab_size\)"),
        (["--ckpt_path", "{ckpt}", "--component", "pkm"], r"inspect: the checkpoint has no component 'pkm'; its instances: mlp, router, sga, ssm"),
        (["--ckpt_path", "{ckpt}", "--task", "mqr"], r"inspect: unknown task 'mqr'; tasks: mqar, distant-premise"),
        (["--ckpt_path", "{ckpt}", "--task", "mqar", "--task_args", "{{num_pairs: 4}}"], r"inspect: --task_args is not JSON"),
        (["--ckpt_path", "{ckpt}", "--task", "mqar", "--task_args", '{{"num_pairs": 99}}'], r"inspect: --task mqar --task_args .*MQAR: num_pairs must lie in 1\.\.num_keys"),
        (["--ckpt_path", "{lone}"], r"inspect: the synthetic task .*lone\.ckpt was trained on is not known .* name one with --task \(mqar,"),
        (["--ckpt_path", "{ckpt}", "--examples", "0"], r"inspect: --examples must be at least 1"),
    ],
    ids=["missing", "corrupt", "foreign", "vocab-too-large", "unknown-component", "unknown-task", "bad-json", "bad-task-args", "no-run-config", "no-examples"],
)
def test_bad_input_is_one_line_and_exit_code_2(trained, tmp_path, capsys, extra, expected):
    (tmp_path / "garbage.ckpt").write_bytes(bytes(range(256)) * 10)
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "foreign.ckpt")
    shutil.copy(trained["ckpt"], tmp_path / "lone.ckpt")
    files = {"missing": tmp_path / "missing.ckpt", "garbage": tmp_path / "garbage.ckpt", "foreign": tmp_path / "foreign.ckpt", "ckpt": trained["ckpt"], "lone": tmp_path / "lone.ckpt"}
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in extra]
    assert main(["inspect", *args, "--out", str(tmp_path / "never.png")]) == 2
    captured = capsys.readouterr()
    assert re.search(expected, flat(captured.err)), captured.err
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert not (tmp_path / "never.png").exists()
