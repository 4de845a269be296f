"""A module's weights packed once for a kernel, owned by the module and rebuilt whenever they have changed.

A decoding step hands the same dozen weights to a kernel on every token. Reaching each through the module tree
costs about half a microsecond (``nn.Module.__getattr__``), and checking that it suits the kernel and converting
its address to ctypes about as much again: for one step that is more than the kernel's own fixed cost. A module
therefore owns a :class:`PackedWeights` (composition: ``self._step_pack = PackedWeights()``) and asks it for the
pack on every step; the pack is built by the module's own function and kept until something it read changed.

What "changed" means is decided by a key, checked on every call, made of everything the build read through its
``read`` argument, hop by hop along each dotted path (``read("experts.0.gate_up.weight")``):

- the identity of each object found (a submodule, a Parameter, a buffer, a plain attribute): a replaced
  submodule or Parameter (``m.out_proj = Linear(...)``, ``load_state_dict(..., assign=True)``), and the plain
  tensors ``torch.func.functional_call`` puts in a module's place for one call, are other objects;
- for each tensor its data pointer, shape and version counter: ``p.data = ...`` (a new storage, or a view of
  another shape), a device or dtype move (``.to()``, ``.double()``), and any in-place write (an optimizer step,
  ``load_state_dict``) change one of them.

So the pack can never hold weights the module no longer has. A copy or a pickle of the module carries its
:class:`PackedWeights` empty (the pack holds this module's tensors and ctypes addresses, which cannot be pickled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from torch import Tensor, nn

__all__ = ["PackedWeights", "Reader"]

P = TypeVar("P")
_MISSING = object()
Reader = Callable[[str], Any]  # read(dotted path) -> the attribute there, recorded in the pack's key


def _tables(module: nn.Module) -> tuple[dict[str, Any], ...]:
    # Where nn.Module keeps what an attribute lookup finds: plain attributes first (found before __getattr__),
    # then Parameters, buffers and submodules (a name lives in one of them only).
    return (module.__dict__, module._parameters, module._buffers, module._modules)


class PackedWeights(Generic[P]):
    """The cached result of a module's pack function, rebuilt when any object or tensor it read has changed.

    Usage, in a module::

        self._step_pack = PackedWeights()            # in __init__
        pack = self._step_pack.get(self, self._pack)  # in step; _pack(read) reads through read("a.b.weight")

    ``_pack`` must read every tensor and submodule it uses through ``read`` (what it reads otherwise is not
    watched). Checking the key (see the module docstring) costs a few dictionary look-ups per object read.
    """

    def __init__(self) -> None:
        self._pack: P | None = None
        self._links: tuple[tuple[dict[str, Any], str, Any], ...] = ()  # (table, name, object found there)
        self._tensors: tuple[tuple[Tensor, int, tuple[int, ...], int], ...] = ()  # (tensor, data_ptr, shape, version)

    def get(self, module: nn.Module, build: Callable[[Reader], P]) -> P:
        """The pack of ``module``: the cached one while nothing it read has changed, else ``build(read)`` anew."""
        pack = self._pack
        if pack is not None and self._fresh():
            return pack
        return self._rebuild(module, build)

    def clear(self) -> None:
        """Drop the pack: the next :meth:`get` builds it again."""
        self._pack, self._links, self._tensors = None, (), ()

    def _fresh(self) -> bool:
        for table, name, found in self._links:
            if table.get(name, _MISSING) is not found:
                return False
        for t, ptr, shape, version in self._tensors:
            if t._version != version or t.data_ptr() != ptr or t.shape != shape:
                return False
        return True

    def _rebuild(self, module: nn.Module, build: Callable[[Reader], P]) -> P:
        links: dict[tuple[int, str], tuple[dict[str, Any], str, Any]] = {}
        tensors: dict[int, Tensor] = {}

        def read(path: str) -> Any:
            obj: Any = module
            for name in path.split("."):
                if not isinstance(obj, nn.Module):
                    raise AttributeError(f"PackedWeights: {path!r} of {type(module).__name__} passes through a {type(obj).__name__}, not a module")
                owner = obj
                for table in _tables(owner):
                    if name in table:
                        obj = table[name]
                        links[(id(table), name)] = (table, name, obj)
                        break
                else:
                    raise AttributeError(f"PackedWeights: {type(owner).__name__} has no attribute {name!r} (reading {path!r})")
            if isinstance(obj, Tensor):
                tensors[id(obj)] = obj
            return obj

        self.clear()
        pack = build(read)
        # Recorded after the build: a tensor it wrote in place (none should) is keyed as it is now.
        self._links = tuple(links.values())
        self._tensors = tuple((t, t.data_ptr(), tuple(t.shape), t._version) for t in tensors.values())
        self._pack = pack
        return pack

    def __getstate__(self) -> dict[str, Any]:
        # A copy or a pickle starts empty: the pack's tensors and addresses belong to the original module.
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"PackedWeights({'empty' if self._pack is None else f'{len(self._links)} objects, {len(self._tensors)} tensors'})"
