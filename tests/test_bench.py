"""hydra-kit bench: a smoke run at tiny sizes through the real command, and the target checks on known records."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO

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
    # The same decode comparison on PyTorch ops only; the switch is restored for the rest of the process.
    off = tmp_path / "off"
    decode_only = ["--recipes", str(REPO / "recipes/tiny.yaml"), str(baseline), "--seq_lens", "32", "--modes", "decode"]
    assert hydra_kit(["bench", *decode_only, "--repeats", "1", "--warmup", "0", "--out", str(off), "--cpu-kernels", "off"]) == 0
    assert json.loads((off / "bench.json").read_text())["cpu_kernels"] is False
    native.set_enabled(True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_accelerator_without_gpu_says_why(capsys):
    assert hydra_kit(["bench", "--accelerator", "gpu", "--seq_lens", "32"]) == 2
    err = capsys.readouterr().err
    assert "--accelerator gpu needs a CUDA device" in err and "install-gpu.sh" in err
