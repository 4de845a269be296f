"""The C tier is optional: without a C compiler every op runs its PyTorch path, after one warning for all of them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hydra_kit.ops import dispatch, native

from .test_native_decode import LIBRARIES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No C compiler on this machine, and no library loaded yet; afterwards the libraries load again on first use."""
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_warned", set())
    for library in LIBRARIES:
        library.reset()
    try:
        yield
    finally:
        for library in LIBRARIES:
            library.reset()


def _decode(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        state, logits = model.init_state(ids.shape[0]), []  # type: ignore[operator]
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], state, collect_aux=False)
            logits.append(out.logits)
            state = out.state
    return torch.cat(logits, 1)


def test_without_a_compiler_every_op_runs_pytorch_after_one_warning(no_compiler: None, caplog: pytest.LogCaptureFixture) -> None:
    from hydra_kit.bench import build_model

    model = build_model(str(REPO / "recipes/tiny.yaml")).eval()
    ids = torch.randint(0, model.hparams["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(80))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        decoded = _decode(model, ids)  # every decoding op asks for its kernel here
        for library in LIBRARIES:
            assert dispatch.kernel(library, torch.zeros(1)) is None
            reason = library.unavailable_reason()
            assert reason is not None and "no C compiler" in reason and library.source.name in reason
    with native.native_kernels(False):
        reference = _decode(model, ids)
    torch.testing.assert_close(decoded, reference)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == native.__name__]
    assert len(warnings) == 1, warnings
    assert "no C compiler" in warnings[0] and "PyTorch" in warnings[0]


def test_a_failed_build_is_not_an_error(no_compiler: None) -> None:
    from hydra_kit.ops import Linear, rms_norm

    layer = Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(rms_norm(x, torch.ones(16), 1e-6), torch.nn.functional.rms_norm(x, (16,), torch.ones(16), 1e-6))
