"""The optional C tier of the ops: C sources compiled on first use with the machine's C compiler, and loaded.

Decoding one token is a chain of matrix-vector products and small element-wise steps. On small CPUs two costs
dominate it, and neither is arithmetic: streaming the weights (PyTorch's matrix-vector product reads a weight
several times slower than a plain two-thread OpenMP dot-product loop; ``docs/benchmarks.md`` has the numbers), and
the fixed cost of each eager PyTorch op, times the 20-30 small ops of a recurrent step. The kernels of
:mod:`hydra_kit.ops` do a whole step in one call. Each op keeps its PyTorch path, the reference the tests hold the
kernel to; whether a call takes the kernel is decided in one place, :mod:`hydra_kit.ops.dispatch`.

The C tier is optional. Without a C compiler (or on a system that is not POSIX) every kernel is off, one warning
says why (logged once per distinct reason, not once per op), and every op runs its PyTorch path;
:meth:`NativeLibrary.unavailable_reason` says why a given library cannot be used.

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
kernels share its threads and its thread count.

Every wrapper checks the tensors it hands to C (shapes, dtype, contiguity, device) against each other: a call
the kernel cannot take runs the PyTorch path, and arguments that do not fit together raise, as PyTorch would,
before C reads a byte.
"""

from __future__ import annotations

import ctypes
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

__all__ = [
    "NativeLibrary",
    "addresses",
    "cache_dir",
    "enabled",
    "native_kernels",
    "ptr",
    "set_cache_dir",
    "set_enabled",
]

log = logging.getLogger(__name__)

# -fno-math-errno lets loops over expf vectorise (glibc's vector maths); no kernel reads errno.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c11"]

_enabled = True
_cache_dir: Path | None = None  # None: default_cache_dir()
_warned: set[str] = set()  # reasons already logged: a missing compiler is one warning, not one per library
_warn_lock = threading.Lock()


def set_enabled(flag: bool) -> None:
    """Switch the C kernels on or off for this process (on by default; off runs the PyTorch paths)."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    """Whether the C kernels may be used (they still need a compiler and suitable tensors: :mod:`.dispatch`)."""
    return _enabled


@contextmanager
def native_kernels(flag: bool) -> Iterator[None]:
    """Run a block with the C kernels switched on or off, then restore the previous setting."""
    previous = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def _compiler() -> str | None:
    """The C compiler on PATH (cc, gcc or clang), or None; looked up at each build so a test can hide it."""
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _warn_once(reason: str) -> None:
    """Log ``reason`` as a warning unless this process already logged the same words."""
    with _warn_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    log.warning("%s; the ops run their PyTorch paths", reason)


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
            "(chmod 700 it, or choose another directory with hydra_kit.ops.native.set_cache_dir)"
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
                f"(uid {uid}) or root; refusing to use it (choose another directory with hydra_kit.ops.native.set_cache_dir)"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise RuntimeError(
                f"{what} {path}: the directory above it, {directory}, is writable by group or others and not sticky "
                f"(mode {stat.S_IMODE(info.st_mode):o}), so others could replace the cache; refusing to use it "
                "(chmod go-w it, or choose another directory with hydra_kit.ops.native.set_cache_dir)"
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
        """The loaded library, or None when it cannot be built here (see :meth:`unavailable_reason`).

        The first call builds (or finds in the cache) and loads it; a failure is logged once per distinct reason,
        so a machine without a compiler gets one warning for all the libraries.
        """
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self._library = self._build()
                    except (OSError, RuntimeError, AttributeError) as err:
                        self._reason = f"the C kernel of {self.source.name} is unavailable: {err}"
                        # The environment's reasons (no compiler, a refused cache) read the same for every library.
                        _warn_once(f"C kernels are unavailable: {err}")
                    self._tried = True
        return self._library

    def unavailable_reason(self) -> str | None:
        """Why the library cannot be used, in words, or None when it can (builds it if needed)."""
        if self.load() is None:
            return self._reason
        return None

    def reset(self) -> None:
        """Forget the outcome of the last load: the next use builds or loads again (after a compiler is installed,
        or :func:`set_cache_dir` names another directory)."""
        with self._lock:
            self._library, self._reason, self._tried = None, None, False


def ptr(t: Tensor | None) -> int | None:
    """The address of a tensor's first element, for a ctypes call (None for a missing tensor)."""
    return None if t is None else t.data_ptr()


def addresses(tensors: Sequence[Tensor | None]) -> ctypes.Array[ctypes.c_void_p]:
    """A C array of the tensors' addresses (NULL for None), for a kernel that reads the same weights every step.

    Built once and cached (:class:`hydra_kit.ops.packed.PackedWeights`), it saves a ``data_ptr()`` and a ctypes conversion per
    weight per call. It is valid while the tensors' storage lives: keep ``t.detach()`` of each beside it, which
    holds the storage (and the shape the kernel was told) even if a Parameter's ``.data`` is later replaced.
    """
    return (ctypes.c_void_p * len(tensors))(*(ptr(t) for t in tensors))
