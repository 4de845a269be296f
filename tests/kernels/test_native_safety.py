"""The C decoding kernels' safety: checks at the kernel boundary, cached weights that follow replacement, the build cache.

- Every wrapper checks what it hands to C; the calls of ``_boundary_cases.py`` run in a child process, because
  before these checks some of them aborted the interpreter.
- :class:`hydra_kit.ops.packed.PackedWeights` notices a replaced Parameter or submodule, so the kernel reads the
  weights the module has now, never stale or freed ones.
- Libraries are built in a directory private to the user, keyed by the CPU, under a lock shared between processes.
"""

from __future__ import annotations

import copy
import ctypes
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hydra_kit.components.moe import MixtureOfExperts
from hydra_kit.components.ssm import SelectiveSSM
from hydra_kit.ops import Linear, moe_step, native, router_step, ssm_step, workspace_step
from hydra_kit.protocol import ComponentContext

from ._boundary_cases import CASES
from .test_native_decode import LIBRARIES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
Calls = Callable[..., Counter[str]]  # the kernel_calls fixture
needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on PATH")


# ---------------------------------------------------------------------------------------------------------------
# Checks at the kernel boundary


@pytest.fixture(scope="module")
def boundary_outcomes() -> dict[str, dict[str, Any]]:
    """What each case of ``_boundary_cases.py`` did, run in child processes: after a crash, the next resumes after it."""
    for library in LIBRARIES:
        if library.load() is None:
            pytest.skip(library.unavailable_reason() or f"{library.source.name} is unavailable")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outcomes: dict[str, dict[str, Any]] = {}
    remaining = list(CASES)
    while remaining:
        command = [sys.executable, str(HERE / "_boundary_cases.py"), *remaining]
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        last = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if record.get("started"):
                last = record["case"]
            else:
                outcomes[record["case"]] = record
        if proc.returncode == 0 or last is None or last in outcomes:
            break
        outcomes[last] = {"ok": False, "did": f"killed the process (status {proc.returncode}): {proc.stderr.strip()[-1500:]}"}
        remaining = remaining[remaining.index(last) + 1 :]
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_call_the_kernel_cannot_take_raises_or_runs_pytorch(case: str, boundary_outcomes: dict[str, dict[str, Any]]) -> None:
    outcome = boundary_outcomes.get(case)
    assert outcome is not None, f"{case} never ran"
    assert outcome["ok"], f"{case}: expected {CASES[case][0]}, got: {outcome['did']}"


def test_the_issue_repro_raises_in_process(kernel_calls: Calls) -> None:
    """``linear(randn(3, 16), randn(4, 8))`` under no_grad: PyTorch's error, not C reading past the weight."""
    from hydra_kit.ops import linear, norm
    from hydra_kit.ops.linear import LIBRARY as LINEAR_LIBRARY

    calls = kernel_calls(LINEAR_LIBRARY, norm.LIBRARY)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(3x16 and 8x4\)"):
            linear(torch.randn(3, 16), torch.randn(4, 8))
        with pytest.raises(RuntimeError, match="normalized_shape"):
            norm.rms_norm(torch.randn(3, 16), torch.randn(8), 1e-6)
        linear(torch.randn(3, 16), torch.randn(4, 16))  # while fitting shapes do go to C
        norm.rms_norm(torch.randn(3, 16), torch.randn(16), 1e-6)
    assert calls == Counter({"hk_linear": 1, "hk_rms_norm": 1})


# ---------------------------------------------------------------------------------------------------------------
# Cached kernel weights follow the module


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _like(p: torch.Tensor, seed: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)


def _ssm_steps(ssm: SelectiveSSM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        state = ssm.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        updates = []
        for t in range(x.shape[1]):
            out = ssm.step(x[:, t].contiguous(), state)
            updates.append(out.update)
            state = out.state
    return torch.stack(updates, 1)


def _both_ways(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    fast = run()
    with native.native_kernels(False):
        return fast, run()


def test_ssm_kernel_follows_a_replaced_weight_and_a_replaced_submodule(kernel_calls: Calls) -> None:
    ssm = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8), 20)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(21))
    calls = kernel_calls(ssm_step.LIBRARY)
    before, _ = _both_ways(lambda: _ssm_steps(ssm, x))  # the cache is built here
    ssm.out_proj.weight = _like(ssm.out_proj.weight, 22)  # the issue's case
    fast, reference = _both_ways(lambda: _ssm_steps(ssm, x))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, before)
    in_proj = Linear(32, ssm.in_proj.out_features, bias=False)  # a whole submodule replaced
    ssm.in_proj = _perturbed(in_proj, 23)
    fast, reference = _both_ways(lambda: _ssm_steps(ssm, x))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert calls["hk_ssm_step"] == 9  # three tokens with the kernel, each time


def test_ssm_kernel_never_reads_a_replaced_weight_of_another_shape(kernel_calls: Calls) -> None:
    ssm = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8), 24)
    x = torch.randn(1, 2, 32)
    calls = kernel_calls(ssm_step.LIBRARY)
    _ssm_steps(ssm, x)
    wide = ssm.out_proj.weight.shape[1] + 8
    ssm.out_proj.weight = nn.Parameter(torch.randn(32, wide))  # C would read past each row of the old shape
    with pytest.raises(ValueError, match=r"ssm_step: d_inner .* do not fit"):
        _ssm_steps(ssm, x)
    with native.native_kernels(False), pytest.raises((ValueError, RuntimeError)):  # the PyTorch step cannot run either
        _ssm_steps(ssm, x)
    assert calls["hk_ssm_step"] == 2


def test_kernels_follow_in_place_updates_an_optimizer_step_and_a_state_dict_load(kernel_calls: Calls) -> None:
    ssm = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8), 25)
    other = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8), 26)
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(27))
    calls = kernel_calls(ssm_step.LIBRARY)
    before, _ = _both_ways(lambda: _ssm_steps(ssm, x))
    optimizer = torch.optim.SGD(ssm.parameters(), lr=0.5)
    ssm(x).update.square().sum().backward()
    optimizer.step()  # in place: the same storage, new values
    fast, reference = _both_ways(lambda: _ssm_steps(ssm, x))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, before)
    ssm.load_state_dict(other.state_dict())  # copied in place
    fast, reference = _both_ways(lambda: _ssm_steps(ssm, x))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, _ssm_steps(other, x), rtol=1e-5, atol=1e-5)
    assert calls["hk_ssm_step"] == 3 * 3 + 3  # and `other` ran with the kernel too


def test_a_copied_module_reads_its_own_weights(kernel_calls: Calls) -> None:
    ssm = _perturbed(SelectiveSSM(32, 0, d_state=8, headdim=8), 35)
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(36))
    calls = kernel_calls(ssm_step.LIBRARY)
    before = _ssm_steps(ssm, x)  # the original's cache is built
    twin = copy.deepcopy(ssm)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)  # in place, in the copy only
    fast, reference = _both_ways(lambda: _ssm_steps(twin, x))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_ssm_steps(ssm, x), before)  # the original is untouched
    torch.save(ssm, io.BytesIO())  # and a module with a cache pickles
    assert calls["hk_ssm_step"] == 9


def test_moe_router_and_workspace_kernels_follow_replaced_weights(kernel_calls: Calls) -> None:
    from hydra_kit.components.router import TokenRouter
    from hydra_kit.components.workspace import WorkspaceMemory

    calls = kernel_calls(moe_step.LIBRARY, router_step.LIBRARY, workspace_step.LIBRARY)
    lean = ComponentContext(collect_aux=False)
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(28))
    moe = _perturbed(MixtureOfExperts(32, 0, n_experts=4, top_k=2, expert_hidden=16), 29)
    router = TokenRouter(32, 0)
    router.configure_gates(["a", "b"])
    router = _perturbed(router, 30)
    memory = _perturbed(WorkspaceMemory(32, 0, n_slots=4, d_slot=16, chunk_size=4), 31)
    with torch.no_grad():
        state = memory(torch.randn(1, 5, 32)).state
        runs: dict[str, Callable[[], torch.Tensor]] = {
            "moe": lambda: moe.step(x, None, lean).update,
            "router": lambda: router.route(x[:, None], collect_aux=False).gates,
            "workspace": lambda: memory.step(x, state).update,
        }
        before = {name: run() for name, run in runs.items()}  # caches built
        for i, expert in enumerate(moe.experts):
            expert.down.weight = _like(expert.down.weight, 40 + i)
        moe.router.weight = _like(moe.router.weight, 39)
        assert router.gate_proj is not None
        router.gate_proj.weight = _like(router.gate_proj.weight, 45)
        memory.out.weight = _like(memory.out.weight, 46)
        for name, run in runs.items():
            fast, reference = _both_ways(run)
            torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5, msg=name)
            assert not torch.allclose(fast, before[name]), name
    assert calls == Counter({"hk_moe_step": 2, "hk_router_step": 2, "hk_workspace_read": 2})


def test_block_decoding_follows_a_replaced_norm_weight_and_layerscale(kernel_calls: Calls) -> None:
    from hydra_kit.bench import build_model
    from hydra_kit.ops import norm
    from hydra_kit.ops.residual import LIBRARY as RESIDUAL

    model = _perturbed(build_model(str(REPO / "recipes/tiny.yaml")), 32)
    ids = torch.randint(0, model.hparams["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(33))

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            state, steps = model.init_state(1), []
            for t in range(ids.shape[1]):
                out = model(ids[:, t : t + 1], state, collect_aux=False)
                steps.append(out.logits)
                state = out.state
        return torch.cat(steps, 1)

    calls = kernel_calls(norm.LIBRARY, RESIDUAL)
    before = decode()
    block = model.blocks[0]
    block.norm.weight = _like(block.norm.weight, 34)
    name = next(iter(block.layerscale))
    block.layerscale[name] = nn.Parameter(torch.tensor(-2.0))
    fast, reference = _both_ways(decode)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast, before, atol=1e-3)
    assert calls["hk_rms_norm"] > 0 and calls["hk_gated_residual"] == 2 * 2 * ids.shape[1]  # two blocks, two runs


# ---------------------------------------------------------------------------------------------------------------
# The build cache

SOURCE = "void hk_add(float *x, long n, float v) { for (long i = 0; i < n; i++) x[i] += v; }\n"
SIGNATURES: dict[str, list[type]] = {"hk_add": [ctypes.c_void_p, ctypes.c_long, ctypes.c_float]}


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    """An empty kernel cache directory (not yet created) for this test; the default again afterwards."""
    path = tmp_path / "cache" / "kernels"
    native.set_cache_dir(path)
    try:
        yield path
    finally:
        native.set_cache_dir(None)


def _library(tmp_path: Path) -> native.NativeLibrary:
    source = tmp_path / "hk_add.c"
    source.write_text(SOURCE)
    return native.NativeLibrary(source, SIGNATURES)


def _works(library: native.NativeLibrary) -> bool:
    loaded = library.load()
    if loaded is None:
        return False
    x = torch.zeros(3)
    loaded.hk_add(x.data_ptr(), 3, 2.0)
    return bool(torch.equal(x, torch.full((3,), 2.0)))


def test_the_default_cache_is_in_the_users_cache_directory() -> None:
    assert native.cache_dir() == Path.home() / ".cache" / "hydra-kit" / "kernels"


@needs_compiler
def test_the_cache_directory_is_created_private_and_holds_only_finished_libraries(tmp_path: Path, cache: Path) -> None:
    assert _works(_library(tmp_path))
    assert stat.S_IMODE(cache.stat().st_mode) & 0o077 == 0 and stat.S_IMODE(cache.parent.stat().st_mode) & 0o077 == 0
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 2 and names[0].endswith(".so") and names[1] == names[0] + ".lock", names  # no temporary file left
    assert stat.S_IMODE((cache / names[1]).stat().st_mode) & 0o077 == 0
    assert _works(_library(tmp_path))  # a second process (here: a second library object) loads the same file
    assert len(list(cache.iterdir())) == 2


@needs_compiler
def test_a_cache_directory_others_can_write_is_refused(tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache.mkdir(parents=True)
    cache.chmod(0o777)  # a shared directory: anyone could plant a library there
    library = _library(tmp_path)
    assert library.load() is None
    reason = library.unavailable_reason()
    assert reason is not None and "writable by group or others" in reason and str(cache) in reason
    assert "writable by group or others" in caplog.text  # the warning; callers take the PyTorch path
    assert list(cache.iterdir()) == []  # nothing built, nothing loaded


@needs_compiler
def test_a_cache_directory_owned_by_someone_else_is_refused(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.mkdir(parents=True, mode=0o700)
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)  # the directory now belongs to another user
    library = _library(tmp_path)
    assert library.load() is None
    reason = library.unavailable_reason()
    assert reason is not None and f"belongs to uid {me}" in reason


@needs_compiler
def test_a_cache_below_a_world_writable_non_sticky_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename the home directory below it away and put their own in its place
    home = shared / "home"
    (home / ".cache" / "hydra-kit" / "kernels").mkdir(parents=True, mode=0o700)
    for d in (home, home / ".cache", home / ".cache" / "hydra-kit"):
        d.chmod(0o700)
    monkeypatch.setenv("HOME", str(home))
    native.set_cache_dir(None)  # the default, ~/.cache/hydra-kit/kernels
    library = _library(tmp_path)
    assert library.load() is None
    reason = library.unavailable_reason()
    assert reason is not None and f"the directory above it, {shared}, is writable by group or others and not sticky" in reason
    assert reason.count("refusing") == 1 and caplog.text.count("is writable by group or others and not sticky") == 1  # one warning
    assert list((home / ".cache" / "hydra-kit" / "kernels").iterdir()) == []  # nothing built, nothing loaded


@needs_compiler
def test_a_missing_cache_is_not_created_below_a_world_writable_non_sticky_directory(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o707)  # writable by others, no sticky bit
    library = _library(tmp_path)
    assert library.load() is None
    assert "not sticky" in str(library.unavailable_reason())
    assert not cache.exists()  # refused before anything was created inside it


@needs_compiler
def test_a_cache_reached_through_a_link_in_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "link").symlink_to(private)  # safe where it points, but anyone may replace the link
    native.set_cache_dir(shared / "link" / "kernels")
    try:
        library = _library(tmp_path)
        assert library.load() is None
        assert f"{shared}, is writable by group or others and not sticky" in str(library.unavailable_reason())
    finally:
        native.set_cache_dir(None)


@needs_compiler
def test_a_cache_below_a_sticky_world_writable_directory_is_accepted(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o1777)  # like /tmp: others may add entries, but not rename or remove ours
    assert _works(_library(tmp_path))


@needs_compiler
def test_a_cache_below_a_directory_owned_by_someone_else_is_refused(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / "cache"
    theirs.mkdir(mode=0o755)
    cache.mkdir(mode=0o700)
    me = os.getuid()
    if me == 0:
        os.chown(theirs, 4321, 4321)  # root may give it away; the cache itself stays root's
        owner = 4321
    else:
        monkeypatch.setattr(os, "getuid", lambda: me + 1)  # every directory of this user now belongs to "another"
        owner = me
    library = _library(tmp_path)
    assert library.load() is None
    reason = library.unavailable_reason()
    assert reason is not None and "the directory above it" in reason and f"belongs to uid {owner}" in reason


@needs_compiler
def test_a_library_file_others_can_write_is_refused(tmp_path: Path, cache: Path) -> None:
    assert _works(_library(tmp_path))
    (built,) = cache.glob("*.so")
    built.chmod(0o666)
    library = _library(tmp_path)
    assert library.load() is None
    reason = library.unavailable_reason()
    assert reason is not None and "kernel library" in reason and "writable by group or others" in reason


@needs_compiler
def test_the_cache_key_includes_the_cpu(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = native._compiler()
    assert compiler is not None
    identity = native._toolchain(compiler)
    assert any(mark in identity for mark in ("-march=", "flags", "Features")), "neither -march=native's resolution nor the CPU flags"
    for cpu in ("cpu A", "cpu B"):
        monkeypatch.setattr(native, "_toolchain", lambda _compiler, cpu=cpu: cpu)
        assert _works(_library(tmp_path))
    assert len(list(cache.glob("*.so"))) == 2  # one library per CPU, never one CPU's code on another


CHILD = textwrap.dedent(
    """
    import ctypes, sys, time
    from pathlib import Path
    from hydra_kit.ops import native

    cache, source, compiler, ready, me = sys.argv[1:]
    native.set_cache_dir(cache)
    native._compiler = lambda: compiler
    native._toolchain(compiler)  # before the barrier: both then go straight to the build
    Path(ready, me).touch()
    deadline = time.monotonic() + 120
    while len(list(Path(ready).iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    library = native.NativeLibrary(Path(source), {"hk_add": [ctypes.c_void_p, ctypes.c_long, ctypes.c_float]})
    print("ok" if library.load() is not None else library.unavailable_reason())
    """
)


@pytest.mark.slow
@needs_compiler
def test_two_processes_building_one_library_take_turns(tmp_path: Path) -> None:
    compiler = native._compiler()
    assert compiler is not None
    log, ready, cache = tmp_path / "builds.log", tmp_path / "ready", tmp_path / "cache"
    ready.mkdir()
    wrapper = tmp_path / "cc-wrapper"  # the real compiler, logging each build and taking a second longer
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do if [ "$a" = "-o" ]; then echo build >> "{log}"; sleep 1; fi; done\nexec "{shutil.which(compiler)}" "$@"\n'
    )
    wrapper.chmod(0o700)
    source = tmp_path / "hk_add.c"
    source.write_text(SOURCE)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(cache), str(source), str(wrapper), str(ready), str(i)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    results = [child.communicate(timeout=300) for child in children]
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0 and out.strip() == "ok", out + err
    assert log.read_text().splitlines() == ["build"]  # the second waited for the first, then loaded its library
    assert len(list(cache.glob("*.so"))) == 1 and not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))
