"""The export format: a folder a model is shared in and reloaded from without Lightning (docs/export.md).

``hydra-kit export --ckpt_path CKPT --out DIR`` writes, through :func:`save_pretrained`:

* ``model.safetensors``: the network's weights (safetensors: no pickled code; tensors that share storage, as tied
  weights may, are stored once and restored by the module structure);
* ``config.json``: what rebuilds the network (``model``: the :class:`~hydra_kit.network.HydraNetwork` arguments,
  the recipe's model section), the other hyper-parameters it was trained with (``training``), every component
  instance with the entry point, distribution and version that provided it, the vocabulary size, hydra-kit's
  version, the tokenizer (``"bytes"``, ``"tokenizer.json"`` or null for token ids only) and its end-of-document id,
  and the weights' SHA-256;
* ``tokenizer.json`` when the model reads text through one.

:func:`load_pretrained` (``HydraNetwork.from_pretrained(DIR)``) checks the folder, refuses in one line an export
whose component plugins are not installed or whose files are missing or damaged, and rebuilds the network exactly.
The folder is written under a temporary name and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from hydra_kit import __version__
from hydra_kit.codec import TOKENIZER_FILE, TextCodec, TokenizerSource, load_codec
from hydra_kit.errors import RecipeError
from hydra_kit.registry import ComponentRegistryError, Registry, default_registry

__all__ = ["CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "ExportError", "load_pretrained", "load_tokenizer", "read_config", "save_pretrained"]

log = logging.getLogger(__name__)

FORMAT = "hydra-kit-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

N = TypeVar("N", bound=nn.Module)


class ExportError(RecipeError):
    """An export cannot be written or read; the message names the folder or file, what is wrong and the fix."""


def _plain(value: Any) -> Any:
    """``value`` as JSON types (recipes parsed by jsonargparse hold namespaces and tuples)."""
    return json.loads(json.dumps(value, default=lambda o: o.as_dict() if hasattr(o, "as_dict") else list(o)))


def split_hparams(network_cls: type[nn.Module], hparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trained model's hyper-parameters split into the network's constructor arguments and the rest.

    Returns:
        (model, training): ``model`` rebuilds ``network_cls``; ``training`` holds the remaining hyper-parameters
        (learning rate, schedule), which with ``model`` rebuild the LightningModule. Private keys (``_...``) go.
    """
    params = inspect.signature(network_cls.__init__).parameters
    wanted = {k for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}
    model = {k: _plain(v) for k, v in hparams.items() if k in wanted}
    training = {k: _plain(v) for k, v in hparams.items() if k not in wanted and not k.startswith("_")}
    return model, training


def _component_sources(network: nn.Module) -> dict[str, dict[str, str]]:
    """Per component instance: the entry point, class, distribution and version that provided it."""
    return {
        r.name: {"component": r.entry.name, "class": r.entry.target, "distribution": r.entry.distribution, "version": r.entry.version}
        for r in getattr(network, "resolved", [])
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _check_target(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ExportError(f"--out {out}: already exists; pass --force to replace it, or choose another folder")
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"--out {out}: exists and is not a folder; remove it or choose another folder")
    # --force replaces an earlier export, never a folder of other files (`--out . --force` must not wipe a project).
    if any(out.iterdir()) and read_config(out, check_files=False) is None:
        raise ExportError(f"--out {out}: holds files but no hydra-kit export ({CONFIG_FILE} of format {FORMAT!r}); not replaced even with --force")


def save_pretrained(
    network: nn.Module,
    out: str | os.PathLike[str],
    *,
    model_config: Mapping[str, Any],
    training_config: Mapping[str, Any] | None = None,
    tokenizer: TokenizerSource | None = None,
    source: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``network`` as an export folder (model.safetensors, config.json, tokenizer.json), atomically.

    Args:
        network: the network (a :class:`~hydra_kit.network.HydraNetwork`: its ``resolved`` components are recorded).
        out: the folder to create.
        model_config: the network's constructor arguments (:func:`split_hparams`).
        training_config: the other hyper-parameters it was trained with, kept for reference.
        tokenizer: the tokenizer it reads, or None (token ids only).
        source: where the weights came from (the checkpoint), recorded.
        force: replace an existing export at ``out``.

    Returns:
        The folder written.

    Raises:
        ExportError: ``out`` exists (without ``force``), or is something ``force`` will not replace.
    """
    from safetensors.torch import save_model

    target = Path(out).expanduser()
    _check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp (and safetensors) create private files; an export is for sharing, so it gets the usual modes.
        umask = _umask()
        tmp.chmod(0o777 & ~umask)
        weights = tmp / WEIGHTS_FILE
        save_model(network, str(weights), metadata={"format": "pt", "hydra_kit_format": FORMAT})
        tokenizer_entry: str | None = None
        if tokenizer is not None and tokenizer.kind == "bytes":
            tokenizer_entry = "bytes"
        elif tokenizer is not None and tokenizer.path is not None:
            shutil.copyfile(tokenizer.path, tmp / TOKENIZER_FILE)
            tokenizer_entry = TOKENIZER_FILE
        params = {id(p): p for p in network.parameters()}
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "hydra_kit_version": __version__,
            "architecture": type(network).__name__,
            "vocab_size": getattr(network, "vocab_size", model_config.get("vocab_size")),
            "tokenizer": tokenizer_entry,
            "eos_id": tokenizer.eos_id if tokenizer is not None else None,
            "model": _plain(dict(model_config)),
            "components": _component_sources(network),
            "training": _plain(dict(training_config or {})),
            "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(weights), "parameters": sum(p.numel() for p in params.values())},
            "source": source,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
            _fsync(file)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)  # put the earlier export back rather than leave nothing
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
        _fsync(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def read_config(folder: str | os.PathLike[str], *, check_files: bool = True) -> dict[str, Any] | None:
    """The config.json of an export folder, with the files it lists checked; None where the folder holds no export.

    Raises:
        ExportError: (with ``check_files``) the folder or a file is missing, or config.json is unreadable.
    """
    root = Path(folder).expanduser()
    config_file = root / CONFIG_FILE
    if not check_files and not config_file.is_file():
        return None
    if not root.is_dir():
        raise ExportError(f"{root}: no such export folder (hydra-kit export --ckpt_path CKPT --out {root} writes one)")
    if not config_file.is_file():
        raise ExportError(f"{root}: the export is incomplete: {CONFIG_FILE} is missing (export the checkpoint again)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if not check_files:
            return None
        raise ExportError(f"{config_file}: cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        if not check_files:
            return None
        raise ExportError(f"{config_file}: not a hydra-kit export (expected \"format\": {FORMAT!r})")
    if check_files:
        if not isinstance(config.get("model"), dict) or not isinstance(config.get("components"), dict):
            raise ExportError(f"{config_file}: malformed: it lacks the \"model\" or \"components\" section; export the checkpoint again")
        needed = [WEIGHTS_FILE] + ([TOKENIZER_FILE] if config.get("tokenizer") == TOKENIZER_FILE else [])
        for name in needed:
            if not (root / name).is_file():
                raise ExportError(f"{root}: the export is incomplete: {name} is missing (copy the whole folder, or export the checkpoint again)")
    return config


def _check_components(config: dict[str, Any], registry: Registry, where: Path) -> None:
    """Refuse, in one line, an export whose component plugins are not installed here; warn on other versions."""
    for instance, info in config["components"].items():
        name, dist, version = info.get("component"), info.get("distribution"), info.get("version")
        try:
            entry = registry.resolve(str(name))
        except ComponentRegistryError:
            if name in registry.skipped:
                fix = "third-party plugins are disabled here (--no-plugins / HYDRA_KIT_NO_PLUGINS)"
            else:
                fix = f"install it: pip install '{dist}=={version}'"
            raise ExportError(
                f"{where}: component instance {instance!r} needs the plugin {name!r} ({info.get('class')}) from the distribution "
                f"{dist} {version}, which is not available: {fix}"
            ) from None
        if (entry.distribution, entry.version) != (dist, version):
            log.warning("%s: component %r was exported from %s %s; loading it with %s %s", where, name, dist, version, entry.distribution, entry.version)


def load_pretrained(
    network_cls: type[N],
    folder: str | os.PathLike[str],
    *,
    registry: Registry | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> N:
    """Rebuild the network an export folder holds, with its weights, in eval mode (no Lightning involved).

    Args:
        network_cls: the network class (``HydraNetwork``); built from config.json's ``model`` section.
        folder: the export folder.
        registry: the components to build with; default :func:`hydra_kit.registry.default_registry`.
        device: where to put the weights (default CPU).
        dtype: convert the floating-point weights (default: as stored).

    Raises:
        ExportError: a file is missing or damaged (the weights' SHA-256 differs from config.json's), a component's
            plugin is not installed, or the weights do not fit the architecture; each in one line naming it.
    """
    from safetensors.torch import load_model

    root = Path(folder).expanduser()
    config = read_config(root)
    assert config is not None  # check_files=True raises instead
    config_file = root / CONFIG_FILE
    registry = registry if registry is not None else default_registry()
    _check_components(config, registry, config_file)
    weights = root / WEIGHTS_FILE
    expected = config.get("weights", {}).get("sha256")
    if expected is not None and _sha256(weights) != expected:
        raise ExportError(f"{weights}: damaged: its SHA-256 differs from the one {CONFIG_FILE} recorded (changed on disk or in a copy); export again")
    # The constructor initialises weights that the file then replaces: keep the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        try:
            network = network_cls(**config["model"], registry=registry)
        except (RecipeError, TypeError) as exc:
            raise ExportError(f"{config_file}: the \"model\" section does not build a {network_cls.__name__}: {exc}") from None
    try:
        missing, unexpected = load_model(network, str(weights), strict=False)
    except (RuntimeError, OSError, ValueError) as exc:  # a shape that does not fit, or a file that is not safetensors
        raise ExportError(f"{weights}: does not fit the model {CONFIG_FILE} describes ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        parts = [f"missing {', '.join(sorted(missing)[:5])}" if missing else "", f"unexpected {', '.join(sorted(unexpected)[:5])}" if unexpected else ""]
        raise ExportError(f"{weights}: does not fit the model {CONFIG_FILE} describes ({'; '.join(p for p in parts if p)})")
    if dtype is not None:
        network.to(dtype=dtype)
    network.to(device=device)
    return network.eval()


def load_tokenizer(folder: str | os.PathLike[str]) -> TextCodec | None:
    """The tokenizer of an export folder (bytes, or its tokenizer.json), or None for a model of token ids only.

    Raises:
        ExportError: the folder is not a complete export. TokenizerError: the tokenizer cannot be read.
    """
    root = Path(folder).expanduser()
    config = read_config(root)
    assert config is not None
    eos = config.get("eos_id")
    eos_id = None if eos is None else int(eos)
    if config.get("tokenizer") == "bytes":
        return load_codec(TokenizerSource("bytes", eos_id=eos_id))
    if config.get("tokenizer") == TOKENIZER_FILE:
        return load_codec(TokenizerSource("file", root / TOKENIZER_FILE, eos_id))
    return None
