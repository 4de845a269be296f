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

A source file is compiled once per machine (``cc -O3 -march=native -fopenmp``; about a second) into a cache
directory private to the user (``~/.cache/hydra-kit/kernels`` unless :func:`set_cache_dir` names another): it is
created with mode 0700, and one owned by someone else or writable by group or others is refused (a warning, and
the PyTorch paths run), so no other user can plant a library that this process would load. The directories above
it are checked too, as ssh checks those above its keys: each must belong to root or the user and be writable by
no one else unless it is sticky (as ``/tmp`` is), or the cache is refused in the same way. A library's name is
keyed by a hash of its source, the flags, the compiler and the CPU (what ``-march=native`` resolves to), so a
cache shared between machines never hands one CPU's code to another. Processes building the same library take
turns under a lock file in that directory; each writes under a temporary name and renames, so none ever loads a
half-written library. The OpenMP runtime is the one PyTorch already loaded (the same ``libgomp.so.1``), so the
kernels share its threads and its thread count. Without a C compiler, or when a build fails, :func:`unavailable_reason`
says why and the PyTorch paths run.

Every wrapper checks the tensors it hands to C (shapes, dtype, contiguity, device) against each other: a call
the kernel cannot take runs the PyTorch path, and arguments that do not fit together raise, as PyTorch would,
before C reads a byte.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
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
    "cache_dir",
    "enabled",
    "expect_shape",
    "native_kernels",
    "set_cache_dir",
    "set_enabled",
    "suits",
    "usable",
]

log = logging.getLogger(__name__)

# -fno-math-errno lets loops over expf vectorise (glibc's vector maths); no kernel reads errno.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c11"]

_enabled = True
_cache_dir: Path | None = None  # None: default_cache_dir()


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


def suits(*tensors: Tensor) -> bool:
    """Whether every tensor is contiguous float32 on the CPU: the only layout a kernel reads."""
    for t in tensors:  # a plain loop: this check runs on every decoding step, for every tensor a kernel reads
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def usable(*tensors: Tensor) -> bool:
    """Whether a kernel may take these tensors: kernels on, autograd off, all contiguous float32 on the CPU.

    Only the layout: each wrapper also checks that the shapes fit together before it calls C.
    """
    return _enabled and not torch.is_grad_enabled() and suits(*tensors)


def expect_shape(op: str, name: str, t: Tensor, shape: Sequence[int]) -> None:
    """Raise a ValueError naming the op, the argument and both shapes unless ``t`` has exactly ``shape``."""
    if t.shape != tuple(shape):  # torch.Size is a tuple
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def default_cache_dir() -> Path:
    """Where the kernels are built unless :func:`set_cache_dir` says otherwise: ``~/.cache/hydra-kit/kernels``."""
    return Path.home() / ".cache" / "hydra-kit" / "kernels"


def set_cache_dir(path: str | os.PathLike[str] | None) -> None:
    """Build and load the kernels in ``path`` (None: :func:`default_cache_dir`), for libraries not loaded yet.

    The directory is created with mode 0700 if missing; one owned by another user or writable by group or others,
    or below a directory that is (unless sticky and owned by root or this user), is refused when a library is
    built, and the PyTorch paths run.
    """
    global _cache_dir
    _cache_dir = None if path is None else Path(path)


def cache_dir() -> Path:
    """The directory the kernels are built in (:func:`set_cache_dir`)."""
    return default_cache_dir() if _cache_dir is None else _cache_dir


def _check_private(path: Path, what: str) -> None:
    """Raise unless ``path`` belongs to this user and no one else may write to it."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise RuntimeError(f"{what} {path} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}); refusing to use it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(
            f"{what} {path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); refusing to use it "
            "(chmod 700 it, or choose another directory with hydra_kit.nn.native.set_cache_dir)"
        )


def _check_ancestors(path: Path, what: str) -> None:
    """Raise unless no one but this user (and root) can replace ``path`` through a directory above it.

    Each existing directory from ``/`` down to ``path``'s parent, along the path as given and along its resolved
    form (a symbolic link is only as safe as the directory holding it), must belong to root or this user and must
    not be writable by group or others unless it is sticky (``/tmp``: others may add entries but not rename
    ours). This is the check ssh makes of the directories above its keys: a private cache inside a directory
    anyone may write is not private, since its parent can be renamed away and replaced.
    """
    uid = os.getuid()
    given = Path(os.path.abspath(path))
    above = sorted({*given.parents, *given.resolve().parents}, key=lambda p: (len(p.parts), str(p)))
    for directory in above:
        try:
            info = directory.stat()
        except FileNotFoundError:
            continue  # created below, mode 0700, by this process
        if info.st_uid not in (0, uid):
            raise RuntimeError(
                f"{what} {path}: the directory above it, {directory}, belongs to uid {info.st_uid}, not to this user "
                f"(uid {uid}) or root; refusing to use it (choose another directory with hydra_kit.nn.native.set_cache_dir)"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise RuntimeError(
                f"{what} {path}: the directory above it, {directory}, is writable by group or others and not sticky "
                f"(mode {stat.S_IMODE(info.st_mode):o}), so others could replace the cache; refusing to use it "
                "(chmod go-w it, or choose another directory with hydra_kit.nn.native.set_cache_dir)"
            )


def _private_directory(path: Path) -> Path:
    """``path``, created with mode 0700 if missing, after checking that it and the directories above are safe."""
    _check_ancestors(path, "kernel cache")  # before creating anything inside a directory others may write
    for directory in [*reversed(Path(os.path.abspath(path)).parents), path]:
        if not directory.exists():
            directory.mkdir(mode=0o700, exist_ok=True)
    if not path.is_dir():
        raise RuntimeError(f"kernel cache {path} is not a directory")
    _check_ancestors(path, "kernel cache")  # again: the directories just created, and any symbolic link now resolved
    _check_private(path, "kernel cache")
    return path


_CPU_FIELDS = {"vendor_id", "cpu family", "model", "model name", "flags", "Features", "CPU implementer", "CPU part"}


@functools.cache
def _toolchain(compiler: str) -> str:
    """What decides the machine code besides the source and flags: the compiler and the CPU ``-march=native`` targets."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    parts = [compiler, version, platform.machine(), platform.processor()]
    try:  # the first processor's model and feature flags (Linux)
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break
                if line.split(":", 1)[0].strip() in _CPU_FIELDS:
                    parts.append(line.strip())
    except OSError:
        pass
    # What -march=native resolves to on this machine (GCC; other compilers refuse the query, and the CPU lines stand).
    native = subprocess.run([compiler, "-march=native", "-Q", "--help=target"], capture_output=True, text=True, check=False)
    if native.returncode == 0:
        parts.append(native.stdout)
    return "\n".join(parts)


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created 0600): processes building one library take turns."""
    import fcntl  # POSIX only; _build checks first

    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class NativeLibrary:
    """One C source file, compiled and loaded on first use.

    Args:
        source: path of the ``.c`` file.
        signatures: for each exported function, its ctypes argument types.
        results: the ctypes result type of each function that returns one (the others are void).
    """

    def __init__(self, source: Path, signatures: dict[str, list[type]], results: dict[str, type] | None = None) -> None:
        self.source = source
        self.signatures = signatures
        self.results = dict(results or {})
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._reason: str | None = None
        self._tried = False

    def _build(self) -> ctypes.CDLL:
        if os.name != "posix":
            raise RuntimeError("they need a POSIX system (a private cache directory and a lock file)")
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C compiler (cc, gcc or clang) is on PATH")
        identity = "\n".join([self.source.read_text(), " ".join(FLAGS), _toolchain(compiler)])
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        cache = _private_directory(cache_dir())
        target = cache / f"{self.source.stem}-{key}.so"
        if not target.exists():
            with _exclusive(cache / f"{target.name}.lock"):
                if not target.exists():  # another process may have built it while this one waited
                    self._compile(compiler, cache, target)
        _check_private(target, "kernel library")
        library = ctypes.CDLL(str(target))
        for name, argtypes in self.signatures.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = self.results.get(name)
        return library

    def _compile(self, compiler: str, cache: Path, target: Path) -> None:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache)
        os.close(handle)
        partial = Path(name)
        try:
            built = subprocess.run(
                [compiler, *FLAGS, str(self.source), "-o", str(partial), "-lm"], capture_output=True, text=True, check=False
            )
            if built.returncode != 0:
                raise RuntimeError(f"{compiler} failed on {self.source.name}: {built.stderr.strip()[-2000:]}")
            os.replace(partial, target)  # atomic: a process that finds the name finds the whole library
        finally:
            partial.unlink(missing_ok=True)

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
    holds the storage (and the shape the kernel was told) even if a Parameter's ``.data`` is later replaced.
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


# Counts Parameters and submodules assigned anywhere since the first kernel cache was built (global hooks of
# torch.nn, installed then): a cache built at an older count may hold objects that a module no longer has.
_registrations = 0
_watching = False


def _registered(*_: Any) -> None:
    global _registrations
    _registrations += 1


def _watch_registrations() -> None:
    global _watching
    if not _watching:
        torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
        torch.nn.modules.module.register_module_module_registration_hook(_registered)
        _watching = True


class CachedParameters(nn.Module):
    """Mixin for a module whose decoding step hands the same parameters to a kernel on every token.

    Reaching a parameter through the module tree costs about 1 us per attribute (``nn.Module.__getattr__``),
    and checking that it suits a kernel about as much again: for a step that passes a dozen weights that is
    more than the kernel's own fixed cost. :meth:`kernel_parameters` builds the tuple once, together with
    whether every entry is contiguous float32 on the CPU, and keeps it until the parameters can have changed
    identity or storage:

    - a Parameter or submodule assigned anywhere (``m.out_proj.weight = nn.Parameter(...)``, ``m.out_proj =
      Linear(...)``, ``load_state_dict(..., assign=True)``): a global count of such assignments, kept by
      torch.nn's registration hooks, is part of the cache's key, so one comparison per step notices them;
    - a device or dtype move (``_apply``) or a state-dict load;
    - a copy (``copy.deepcopy``, pickling), which starts without the cache.

    In-place changes (an optimizer step, ``load_state_dict`` without ``assign``) keep the storage, and the
    kernels read the current values. Code that assigns ``param.data`` directly must call
    :meth:`clear_kernel_parameters` (the cache holds detached views, so the kernel reads the old values, never
    freed memory).
    """

    _kernel_parameters: tuple[tuple[Any, ...], bool] | None = None
    _kernel_registrations = -1

    def kernel_parameters(self, build: Callable[[], tuple[Any, ...]]) -> tuple[tuple[Any, ...], bool]:
        """The cached ``build()`` and whether every tensor in it (in lists, tuples and dataclasses) suits the kernels."""
        cached = self._kernel_parameters
        if cached is None or self._kernel_registrations != _registrations:
            _watch_registrations()
            count = _registrations  # before build(): an assignment during it means a rebuild next time
            params = build()
            cached = (params, suits(*_tensors_in(params)))
            self.__dict__["_kernel_parameters"] = cached
            self.__dict__["_kernel_registrations"] = count
        return cached

    def clear_kernel_parameters(self) -> None:
        self.__dict__["_kernel_parameters"] = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy or a pickle goes without the cache: its tensors and addresses are this module's, not the copy's
        # (and ctypes arrays of addresses cannot be pickled).
        state = dict(self.__dict__)
        state.pop("_kernel_parameters", None)
        state.pop("_kernel_registrations", None)
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self.clear_kernel_parameters()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_kernel_parameters()
        super()._load_from_state_dict(*args, **kwargs)
