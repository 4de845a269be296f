"""hydra-kit bench: a smoke run at tiny sizes through the real command, and the target checks on known records."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess

import pytest
import torch
import yaml
from support import REPO

from hydra_kit.bench import DECODE_TOKENS, OTHER, breakdown_rates, build_model, flops_per_token
from hydra_kit.bench_report import Record, check_targets
from hydra_kit.cli import main as hydra_kit
from hydra_kit.ops import native


def _record(model: str, seq_len: int, mode: str, tokens_per_s: float, mem: float | None = None, cache: float | None = None) -> Record:
    return Record(model, seq_len, mode, tokens_per_s, 1.0, [1.0], 1.0, peak_mem_mb=mem, cache_mb=cache)


def test_targets_are_read_from_the_records_of_the_run():
    records = [
        _record("hydra", 2048, "infer", 1000.0, mem=10.0),
        _record("base", 2048, "infer", 900.0, mem=20.0),
        _record("hydra", 8192, "infer", 900.0, mem=40.0),
        _record("base", 8192, "infer", 300.0, mem=30.0),
        _record("hydra", 16384, "infer", 700.0, mem=100.0),
        _record("base", 16384, "infer", 100.0, mem=60.0),
        _record("hydra", 16384, "decode", 40.0, cache=5.0),
        _record("base", 16384, "decode", 10.0, cache=300.0),
    ]
    checks = {c.target: c for c in check_targets(records, ["hydra", "base"])}
    assert checks["infer tokens/s hydra/base at L=8192"].measured == 3.0
    assert checks["infer tokens/s hydra/base at L=8192"].met
    assert checks["infer tokens/s hydra/base at L=16384"].met  # 7x >= 5x
    assert not checks["infer peak memory hydra/base at L=8192"].met  # 40 MB > 30 MB
    assert checks["infer peak memory hydra/base at L=2048"].met
    assert checks["infer peak memory of hydra, L=16384 / L=8192"].measured == 2.5
    assert not checks["infer peak memory of hydra, L=16384 / L=8192"].met
    assert checks["infer tokens/s of hydra, L=16384 / L=2048 (linear scaling)"].measured == 0.7
    assert not checks["decode tokens/s hydra/base at L=16384 (128 tokens after the prompt)"].met  # 4x < 5x
    assert checks["decode cache bytes hydra/base after L=16384"].met
    assert not any("train" in name for name in checks)  # not measured, so not judged
    # A further recipe (a skipping variant) gets the speed targets against the same baseline, nothing else.
    records += [_record("skip", 8192, "infer", 960.0), _record("skip", 16384, "decode", 55.0, cache=5.0)]
    further = {c.target: c for c in check_targets(records, ["hydra", "base", "skip"])}
    assert set(further) - set(checks) == {"infer tokens/s skip/base at L=8192", "decode tokens/s skip/base at L=16384 (128 tokens after the prompt)"}
    assert further["infer tokens/s skip/base at L=8192"].measured == pytest.approx(3.2)
    assert further["decode tokens/s skip/base at L=16384 (128 tokens after the prompt)"].met


@pytest.mark.slow
def test_bench_smoke_run_writes_records_and_targets(tmp_path):
    transformer = {
        "model": {
            "vocab_size": 72,
            "d_model": 64,
            "n_blocks": 2,
            "components": {"attn": {"component": "attention", "blocks": "all", "args": {"n_heads": 2}}, "mlp": {"component": "mlp", "blocks": "all"}},
        }
    }
    baseline = tmp_path / "baseline.yaml"
    baseline.write_text(yaml.safe_dump(transformer))
    out = tmp_path / "bench"
    args = ["--recipes", str(REPO / "recipes/tiny.yaml"), str(baseline), "--seq_lens", "32", "--modes", "infer", "train", "decode"]
    assert hydra_kit(["bench", *args, "--repeats", "1", "--warmup", "0", "--out", str(out), "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {(r["model"], r["seq_len"], r["mode"]) for r in rows} == {(m, n, mode) for m in ("tiny", "baseline") for n in (32,) for mode in ("infer", "train", "decode")}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert all(r["peak_mem_mb"] is not None for r in rows if r["mode"] != "decode")
    assert all(r["cache_mb"] > 0 for r in rows if r["mode"] == "decode")
    payload = json.loads((out / "bench.json").read_text())
    assert payload["matmul_gflops"] > 0 and isinstance(payload["targets"], list)
    assert payload["cpu_kernels"] is True
    assert (out / "bench.csv").read_text().startswith("model,seq_len,mode,tokens_per_s")
    # The achieved FLOP rate and its share of the roof measured in the same run, per model and mode.
    for row in rows:
        assert math.isfinite(row["gflops"]) and row["gflops"] > 0, row
        assert math.isfinite(row["roof_share"]) and row["roof_share"] > 0, row
        assert row["compiled"] is False and row["compile_speedup"] is None
    with (out / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {"gflops", "roof_share", "compiled", "compile_speedup"} <= set(table[0])
    assert all(float(r["roof_share"]) > 0 for r in table)
    # The per-component breakdown (inference only): each instance's time share beside its GFLOP/s.
    infer = {r["model"]: r for r in rows if r["mode"] == "infer"}
    for record in infer.values():
        assert record["breakdown_gflops"] and set(record["breakdown_gflops"]) <= set(record["breakdown"])
        assert all(math.isfinite(v) and v > 0 for v in record["breakdown_gflops"].values())
    with (out / "bench_components.csv").open() as f:
        parts = list(csv.DictReader(f))
    assert {(p["model"], p["component"]) for p in parts} >= {("tiny", "ssm"), ("tiny", "sga"), ("baseline", "attn"), ("baseline", "mlp")}
    for p in parts:
        assert 0 <= float(p["time_share"]) <= 1 and float(p["roof_time_share"]) >= 0
        assert p["gflops"] == "" or (math.isfinite(float(p["gflops"])) and float(p["gflops"]) > 0)
    # The same decode comparison on PyTorch ops only; the switch is restored for the rest of the process.
    off = tmp_path / "off"
    decode_only = ["--recipes", str(REPO / "recipes/tiny.yaml"), str(baseline), "--seq_lens", "32", "--modes", "decode"]
    assert hydra_kit(["bench", *decode_only, "--repeats", "1", "--warmup", "0", "--out", str(off), "--cpu-kernels", "off"]) == 0
    assert json.loads((off / "bench.json").read_text())["cpu_kernels"] is False
    native.set_enabled(True)


def test_a_skipping_model_reports_the_share_of_tokens_each_gated_component_computed(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes/tiny.yaml").read_text())
    recipe["model"]["components"]["router"]["args"] = {"gate_threshold": 0.5, "skip_in_training": True}
    skipping = tmp_path / "tiny-skip.yaml"
    skipping.write_text(yaml.safe_dump(recipe))
    args = ["--recipes", str(skipping), str(REPO / "recipes/tiny.yaml"), "--seq_lens", "32", "--modes", "infer", "train"]
    out = tmp_path / "bench"
    assert hydra_kit(["bench", *args, "--repeats", "1", "--warmup", "0", "--no-memory", "--no-breakdown", "--out", str(out), "--json", str(tmp_path / "b.json")]) == 0
    rows = {(r["model"], r["mode"]): r for r in json.loads((tmp_path / "b.json").read_text())}
    for mode in ("infer", "train"):
        kept = rows["tiny-skip", mode]["kept"]
        assert set(kept) == {"sga", "mlp"} and all(0 < v < 1 for v in kept.values()), kept
        assert rows["tiny", mode]["kept"] == {}  # no threshold: nothing skips, nothing reported
    with (out / "bench.csv").open() as f:
        cells = {(r["model"], r["mode"]): r["kept"] for r in csv.DictReader(f)}
    assert cells["tiny-skip", "infer"].startswith(("sga=", "mlp=")) and cells["tiny", "infer"] == ""


def test_breakdown_rates_divide_each_instances_flops_by_its_time():
    seconds = {"ssm": 0.5, "mlp": 0.25, OTHER: 0.25, "total": 1.0}
    report = {"flops_per_token": 10e6, "components": {"ssm": {"flops_per_token": 4e6}, "mlp": {"flops_per_token": 5e6}}}
    shares, gflops, flops = breakdown_rates(seconds, report, tokens=1000)
    assert shares == {"ssm": 0.5, "mlp": 0.25, OTHER: 0.25}
    assert gflops["ssm"] == pytest.approx(4e9 / 0.5 / 1e9) and gflops["mlp"] == pytest.approx(5e9 / 0.25 / 1e9)
    assert flops[OTHER] == pytest.approx(1e9)  # the head: the report's total less its components'
    assert gflops[OTHER] == pytest.approx(1e9 / 0.25 / 1e9)


def test_counted_flops_per_mode_follow_the_models_accounting():
    model = build_model(str(REPO / "recipes/tiny.yaml"))
    forward = model.parameter_report(64)["flops_per_token"]
    assert flops_per_token(model, 64, "infer") == forward
    assert flops_per_token(model, 64, "train") == 3 * forward
    assert flops_per_token(model, 64, "decode") == model.parameter_report(2 * (64 + DECODE_TOKENS // 2))["flops_per_token"]


@pytest.mark.slow
def test_bench_compile_times_the_compiled_model_beside_the_eager_one(tmp_path):
    transformer = {"model": {"vocab_size": 32, "d_model": 32, "n_blocks": 1, "components": {"mlp": {"component": "mlp", "blocks": "all"}}}}
    recipe = tmp_path / "mlp.yaml"
    recipe.write_text(yaml.safe_dump(transformer))
    args = ["--recipes", str(recipe), "--seq_lens", "16", "--modes", "infer", "train", "decode", "--repeats", "1", "--warmup", "0"]
    assert hydra_kit(["bench", *args, "--compile", "--no-memory", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "b.json")]) == 0
    rows = {(r["model"], r["mode"]): r for r in json.loads((tmp_path / "b.json").read_text())}
    # Decoding runs eager by design, so the compiled model has no decode row.
    assert set(rows) == {("mlp", "infer"), ("mlp", "train"), ("mlp", "decode"), ("mlp+compile", "infer"), ("mlp+compile", "train")}
    for mode in ("infer", "train"):
        compiled = rows[("mlp+compile", mode)]
        assert compiled["compiled"] is True and not rows[("mlp", mode)]["compiled"]
        assert math.isfinite(compiled["compile_speedup"]) and compiled["compile_speedup"] > 0
        assert compiled["gflops"] > 0 and compiled["roof_share"] > 0
        assert not compiled["breakdown"]  # hooks would break the compiled graph


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_accelerator_without_gpu_says_why(capsys):
    assert hydra_kit(["bench", "--accelerator", "gpu", "--seq_lens", "32"]) == 2
    err = capsys.readouterr().err
    assert "--accelerator gpu needs a CUDA device" in err and "install-gpu.sh" in err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the message on a machine without nvidia-smi")
def test_gpu_check_script_stops_at_once_without_a_gpu(tmp_path):
    report = tmp_path / "report"
    result = subprocess.run([str(REPO / "scripts/gpu-check.sh")], capture_output=True, text=True, timeout=60, env={**os.environ, "REPORT": str(report)})
    assert result.returncode == 1
    assert "nvidia-smi not found" in result.stderr and "needs a CUDA machine" in result.stderr
    assert not report.exists()  # nothing installed, nothing written
