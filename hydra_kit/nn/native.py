"""C kernels for one-token decoding on CPU, compiled on first use with the machine's C compiler.

Decoding one token is a chain of matrix-vector products and small element-wise steps. On our 2-core CPUs two
costs dominate it, and neither is arithmetic:

* streaming the weights: PyTorch's matrix-vector product (MKL) reads an ``(out, in)`` weight at 9-10 GB/s, a
  plain two-thread OpenMP dot-product loop at 34-42 GB/s (measured 2026-12-01, 22 matrices of 2192 x 512, more
  than the cache holds);
* the fixed cost of each eager PyTorch op, 5-10 us here, times the 20-30 small ops of a recurrent step.

The kernels here (and those of the components that ship one) do a whole step in one call. Each has a PyTorch
path that computes the same thing and is the reference the tests hold it to; the kernels are used only on
contiguous float32 CPU tensors with autograd off, and everything else takes the PyTorch path.

A source file is compiled once per machine (``cc -O3 -march=native -fopenmp``; about a second) into a cache in
the system's temporary directory, keyed by a hash of the source, the flags and the compiler, written under a
temporary name and renamed, so concurrent processes never load a half-written library. The OpenMP runtime is the
one PyTorch already loaded (the same ``libgomp.so.1``), so the kernels share its threads and its thread count.
Without a C compiler, or when a build fails, :func:`unavailable_reason` says why and the PyTorch paths run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CachedParameters",
    "NativeLibrary",
    "addresses",
    "enabled",
    "native_kernels",
    "set_enabled",
    "usable",
]

log = logging.getLogger(__name__)

# -fno-math-errno lets loops over expf vectorise (glibc's vector maths); no kernel reads errno.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c11"]

_enabled = True


def set_enabled(flag: bool) -> None:
    """Switch the C decoding kernels on or off for this process (on by default; off runs the PyTorch paths)."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    """Whether the C decoding kernels may be used (they still need a compiler and suitable tensors)."""
    return _enabled


@contextmanager
def native_kernels(flag: bool) -> Iterator[None]:
    """Run a block with the C decoding kernels switched on or off, then restore the previous setting."""
    previous = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def usable(*tensors: Tensor) -> bool:
    """Whether a kernel may take these tensors: kernels on, autograd off, all contiguous float32 on the CPU."""
    if not _enabled or torch.is_grad_enabled():
        return False
    for t in tensors:  # a plain loop: this check runs on every decoding step, for every weight the kernel reads
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"hydra-kit-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


class NativeLibrary:
    """One C source file, compiled and loaded on first use.

    Args:
        source: path of the ``.c`` file.
        signatures: for each exported function, its ctypes argument types (results are void).
    """

    def __init__(self, source: Path, signatures: dict[str, list[type]]) -> None:
        self.source = source
        self.signatures = signatures
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._reason: str | None = None
        self._tried = False

    def _build(self) -> ctypes.CDLL:
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C compiler (cc, gcc or clang) is on PATH")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
        key = hashlib.sha256("\n".join([self.source.read_text(), " ".join(FLAGS), version]).encode()).hexdigest()[:16]
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / f"{self.source.stem}-{key}.so"
        if not target.exists():
            partial = cache / f".{target.name}.{os.getpid()}.tmp"
            built = subprocess.run(
                [compiler, *FLAGS, str(self.source), "-o", str(partial), "-lm"], capture_output=True, text=True, check=False
            )
            if built.returncode != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"{compiler} failed on {self.source.name}: {built.stderr.strip()[-2000:]}")
            os.replace(partial, target)
        library = ctypes.CDLL(str(target))
        for name, argtypes in self.signatures.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = None
        return library

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, or None when it cannot be built here (see :meth:`unavailable_reason`)."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self._library = self._build()
                    except (OSError, RuntimeError, AttributeError) as err:
                        self._reason = f"the C decoding kernels of {self.source.name} are unavailable: {err}"
                        log.warning("%s; decoding uses the PyTorch path", self._reason)
                    self._tried = True
        return self._library

    def unavailable_reason(self) -> str | None:
        """Why the library cannot be used, in words, or None when it can (builds it if needed)."""
        if self.load() is None:
            return self._reason
        return None


def ptr(t: Tensor | None) -> int | None:
    """The address of a tensor's first element, for a ctypes call (None for a missing tensor)."""
    return None if t is None else t.data_ptr()


def addresses(tensors: Sequence[Tensor | None]) -> ctypes.Array[ctypes.c_void_p]:
    """A C array of the tensors' addresses (NULL for None), for a kernel that reads the same weights every step.

    Built once and cached (:class:`CachedParameters`), it saves a ``data_ptr()`` and a ctypes conversion per
    weight per call. It is valid while the tensors' storage lives: keep ``t.detach()`` of each beside it, which
    holds the storage even if a Parameter's ``.data`` is later replaced.
    """
    return (ctypes.c_void_p * len(tensors))(*(ptr(t) for t in tensors))


def _tensors_in(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors_in(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors_in(getattr(obj, f.name))


class CachedParameters(nn.Module):
    """Mixin for a module whose decoding step hands the same parameters to a kernel on every token.

    Reaching a parameter through the module tree costs about 1 us per attribute (``nn.Module.__getattr__``),
    and checking that it suits a kernel about as much again: for a step that passes a dozen weights that is
    more than the kernel's own fixed cost. :meth:`kernel_parameters` builds the tuple once, together with
    whether every entry is contiguous float32 on the CPU, and keeps it until the parameters can have changed
    identity or storage: a device or dtype move (``_apply``) or a state-dict load (``assign=True`` replaces
    the Parameter objects). Code that assigns ``param.data`` directly must call :meth:`clear_kernel_parameters`.
    """

    _kernel_parameters: tuple[tuple[Any, ...], bool] | None = None

    def kernel_parameters(self, build: Callable[[], tuple[Any, ...]]) -> tuple[tuple[Any, ...], bool]:
        """The cached ``build()`` and whether every tensor in it (in lists, tuples and dataclasses) suits the kernels."""
        if self._kernel_parameters is None:
            params = build()
            suits = all(t.dtype is torch.float32 and t.is_cpu and t.is_contiguous() for t in _tensors_in(params))
            self.__dict__["_kernel_parameters"] = (params, suits)
        assert self._kernel_parameters is not None
        return self._kernel_parameters

    def clear_kernel_parameters(self) -> None:
        self.__dict__["_kernel_parameters"] = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self.clear_kernel_parameters()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_kernel_parameters()
        super()._load_from_state_dict(*args, **kwargs)
