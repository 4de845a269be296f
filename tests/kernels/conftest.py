"""Fixtures for the kernel tests: counting the calls into the C kernels."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from hydra_kit.ops import native


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Counter[str]]:
    """``kernel_calls(*libraries)``: a Counter of calls into each C function of these libraries for the rest of the test.

    A kernel test asserts on it that its kernel ran: a test comparing a kernel with its PyTorch path passes vacuously
    when both runs take the PyTorch path. The test is skipped, with the reason, when a library cannot be loaded here
    (no C compiler); ``test_every_kernel_builds_on_a_machine_with_a_compiler`` fails for that where a compiler exists.
    """

    def count(*libraries: native.NativeLibrary) -> Counter[str]:
        calls: Counter[str] = Counter()
        for library in libraries:
            loaded = library.load()
            if loaded is None:
                pytest.skip(library.unavailable_reason() or f"{library.source.name} is unavailable")
            for name in library.signatures:
                function = getattr(loaded, name)

                def counted(*args: Any, _name: str = name, _function: Any = function) -> Any:
                    calls[_name] += 1
                    return _function(*args)

                monkeypatch.setattr(loaded, name, counted)
        return calls

    return count
