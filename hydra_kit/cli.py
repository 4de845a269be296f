"""The ``hydra-kit`` command line.

::

    hydra-kit fit --config recipes/full.yaml        # LightningCLI subcommands: fit, validate, test, predict
    hydra-kit components                            # discovered components with distribution and version
    hydra-kit summary --config recipes/full-29m.yaml [--json] [--seq_len 8192]
    hydra-kit inspect --ckpt_path runs/full/version_0/checkpoints/last.ckpt [--task mqar] [--examples 64]

``--no-plugins`` (or ``HYDRA_KIT_NO_PLUGINS=1``) loads only hydra-kit's own components. Recipes are checked
before Lightning parses them, so a mistake is reported with the file, the key and the valid choices.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from hydra_kit.recipe import RecipeError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: hydra-kit [--no-plugins] COMMAND ...

commands:
  fit | validate | test | predict   train or evaluate a recipe (LightningCLI; see `hydra-kit fit --help`)
  components                        list the discovered components
  summary --config RECIPE           parameters (total, active) and FLOPs per token, per component and block
  generate --ckpt_path CKPT ...     stream tokens from a checkpoint (--prompt TEXT or --prompt-ids ...)
  inspect --ckpt_path CKPT ...      per-block gates, LayerScale, update norms, component stats on held-out examples (--help)
  bench [--recipes A B]             tokens/s and peak memory side by side, ratios A/B (--help)
  ablate --drop NAME [--drop ...]   paired runs with and without components, table of deltas (--help)
  experiment NAME | --list          the paper's experiments E1-E6, one command each (--seeds, --steps, --out, --size)

options:
  --no-plugins                      load only hydra-kit's own components (also HYDRA_KIT_NO_PLUGINS=1)
"""


def _console() -> Console:
    # Wide when piped, so tables are not folded into unreadable columns in logs and tests.
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else 160)


def _fail(message: str) -> int:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}")  # no hard wraps in paths
    return 2


# ---------------------------------------------------------------------------------------------- components
def cmd_components(argv: list[str], third_party: bool) -> int:
    """Print the registry: name, path, class, distribution and version, and plugins that failed to load."""
    from hydra_kit.registry import discover

    registry = discover(third_party=third_party)
    table = Table(title="hydra-kit components (entry-point group hydra_kit.components)")
    for column in ("name", "path", "class", "distribution", "version"):
        table.add_column(column)
    for name in registry.names():
        e = registry.entries[name]
        table.add_row(name, e.cls.path.value, f"{e.cls.__module__}.{e.cls.__qualname__}", e.distribution, e.version)
    console = _console()
    console.print(table)
    for failure in registry.failures:
        console.print(f"[yellow]warning:[/] {failure.describe()}")
    if not third_party:
        console.print("third-party plugins are disabled (--no-plugins / HYDRA_KIT_NO_PLUGINS)")
    return 0


# ------------------------------------------------------------------------------------------ recipe checks
def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def load_recipe(path: str) -> dict[str, Any]:
    """Load one YAML recipe; errors name the file (and the line, for YAML syntax errors)."""
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"{path}: recipe file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a YAML recipe (the file is not UTF-8 text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; a recipe is a YAML mapping with model, data and trainer sections (see recipes/tiny.yaml)")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with keys like model, data, trainer; got {type(data).__name__}")
    return data


def _override(argv: list[str], key: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{key}="):
            return arg.split("=", 1)[1]
    return None


def merged_model_section(paths: list[str], argv: list[str] | None = None) -> dict[str, Any]:
    """The model section of several recipes merged in order, with ``--model.n_blocks``-style overrides."""
    model: dict[str, Any] = {}
    for path in paths:
        section = load_recipe(path).get("model") or {}
        if "init_args" in section:
            section = section["init_args"] or {}
        model.update(section)
    for key in ("n_blocks", "d_model", "vocab_size"):
        value = _override(argv or [], f"model.{key}")
        if value is not None and value.lstrip("-").isdigit():
            model[key] = int(value)
    return model


def check_recipes(paths: list[str], argv: list[str]) -> None:
    """Validate the model sections of recipe files before LightningCLI sees them.

    Raises:
        RecipeError: with the file name, the key and the valid choices.
    """
    import inspect

    from hydra_kit.callbacks import check_recipe_callbacks
    from hydra_kit.model import HydraLM
    from hydra_kit.recipe import resolve_components
    from hydra_kit.registry import default_registry

    valid_model_keys = set(inspect.signature(HydraLM.__init__).parameters) - {"self"}
    for key in ("vocab_size", "d_model", "n_blocks"):
        value = _override(argv, f"model.{key}")
        # Checked here, before the component placement below reads n_blocks (it would report "valid: 0..-3").
        if value is not None and value.lstrip("-").isdigit() and int(value) <= 0:
            raise RecipeError(f"--model.{key}: expected a positive integer, got {value}")
    n_blocks = int(merged_model_section(paths, argv).get("n_blocks", 4))
    for path in paths:
        recipe = load_recipe(path)
        model = recipe.get("model") or {}
        if not isinstance(model, dict):
            raise RecipeError(f"{path}: model: expected a mapping, got {model!r}")
        unknown = sorted(set(model) - valid_model_keys)
        if unknown:
            raise RecipeError(f"{path}: model: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(valid_model_keys))}")
        for key in ("vocab_size", "d_model", "n_blocks"):
            if key in model and (not isinstance(model[key], int) or isinstance(model[key], bool) or model[key] <= 0):
                raise RecipeError(f"{path}: model.{key}: expected a positive integer, got {model[key]!r}")
        if "components" in model:
            resolve_components(model["components"], n_blocks, default_registry(), f"{path}: model.components")
        check_recipe_callbacks(path, recipe)


# ------------------------------------------------------------------------------------------------ summary
def cmd_summary(argv: list[str]) -> int:
    """Parameters and FLOPs of a recipe's model, built on the meta device (no memory, any size)."""
    import argparse

    import torch

    from hydra_kit.accounting import embedding_rows
    from hydra_kit.model import HydraLM

    parser = argparse.ArgumentParser(prog="hydra-kit summary", description=cmd_summary.__doc__)
    parser.add_argument("--config", "-c", action="append", required=True, help="recipe YAML (repeatable)")
    parser.add_argument("--seq_len", type=int, default=8192, help="sequence length for FLOPs per token")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args, rest = parser.parse_known_args(argv)
    for path in args.config:
        load_recipe(path)
    check_recipes(args.config, rest)
    cfg = merged_model_section(args.config, rest)
    with torch.device("meta"):
        model = HydraLM(**cfg)
    report = model.parameter_report(args.seq_len)
    report["recipe"] = args.config
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = _console()
    table = Table(title=f"{', '.join(args.config)}: per component instance (seq_len {args.seq_len})")
    for column in ("instance", "blocks", "total params", "active params", "MFLOP/token"):
        table.add_column(column, justify="right" if column != "instance" else "left")
    blocks_of = {r.name: r.blocks for r in model.resolved}
    for name, row in report["components"].items():
        table.add_row(name, ",".join(map(str, blocks_of.get(name, ()))), f"{row['total_params']:,}", f"{row['active_params']:,}", f"{row['flops_per_token'] / 1e6:.2f}")
    for label, params, mflops in embedding_rows(report):
        table.add_row(label, "", f"{params:,}", f"{params:,}", f"{mflops:.2f}")
    console.print(table)
    per_block = Table(title="per block")
    per_block.add_column("block")
    per_block.add_column("components")
    per_block.add_column("params", justify="right")
    for row in report["blocks"]:
        total = sum(c["total_params"] for c in row["components"].values()) + row["norm_and_layerscale_params"]
        per_block.add_row(str(row["block"]), " ".join(row["components"]), f"{total:,}")
    console.print(per_block)
    console.print(
        f"total parameters: [bold]{report['total_params']:,}[/]   active per token: [bold]{report['active_params']:,}[/]   "
        f"forward FLOPs per token at L={args.seq_len}: [bold]{report['flops_per_token'] / 1e6:.1f} M[/]"
    )
    return 0


# ----------------------------------------------------------------------------------------------- generate
def cmd_generate(argv: list[str]) -> int:
    """Generate tokens from a checkpoint, streaming them as they are produced."""
    import argparse
    import codecs

    import torch

    from hydra_kit.checkpoint import load_model

    parser = argparse.ArgumentParser(prog="hydra-kit generate", description=cmd_generate.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by hydra-kit fit")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt, encoded as UTF-8 bytes (byte-level models, vocab >= 256)")
    prompt.add_argument("--prompt-ids", "--prompt_ids", dest="prompt_ids", type=int, nargs="+", help="prompt as token ids")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        raise RecipeError(f"generate: --max_new_tokens: expected an integer >= 0, got {args.max_new_tokens}")
    # `not x >= 0` rather than `x < 0`: NaN compares false with everything and reached torch.multinomial.
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise RecipeError(f"generate: --temperature: expected a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise RecipeError(f"generate: --top_k: expected an integer >= 1, got {args.top_k}")
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise RecipeError(f"generate: --seed: expected an integer in -2**63..2**64-1, got {args.seed}")
    if args.prompt is not None and not args.prompt:
        raise RecipeError("generate: --prompt is empty; give at least one character (or token ids with --prompt-ids)")
    model, _ = load_model(args.ckpt_path)
    vocab = model.hparams["vocab_size"]
    if args.prompt is not None:
        if vocab < 256:
            raise RecipeError(f"--prompt needs a byte-level model (vocab_size >= 256); this one has {vocab}: use --prompt-ids")
        ids = list(args.prompt.encode("utf-8"))
    else:
        ids = args.prompt_ids
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise RecipeError(f"--prompt-ids: ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
    if args.top_k is not None and args.top_k > vocab:
        raise RecipeError(f"generate: --top_k: expected an integer in 1..{vocab} (the model's vocabulary), got {args.top_k}")
    generator = torch.Generator().manual_seed(args.seed)
    tokens = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=generator)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for token in tokens:
            value = int(token[0])
            text = decoder.decode(bytes([value])) if args.prompt is not None and value < 256 else f"{value} "
            sys.stdout.write(text)
            sys.stdout.flush()
        # Bytes of a character the generation cut short come out as U+FFFD, as a whole decode would give them.
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`| head -c 40`): stop quietly, as Unix tools do. Python would flush stdout again at exit
        # and fail on the closed pipe, so point it at devnull first (the Python docs' recipe, library/signal).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


# ---------------------------------------------------------------------------------------------- lightning
# Lightning warnings that say nothing about a hydra-kit run, matched by the start of their message (re.match).
HARMLESS_WARNINGS = (
    # hydra-kit's data modules restore their position from the checkpoint themselves (their state_dict), which
    # Lightning's check of the DataLoader object cannot see.
    r".*your dataloader is not resumable",
    # The CLI passes its arguments on purpose (without --no-plugins), which are also in sys.argv.
    r"LightningCLI's args parameter is intended to run from within Python",
    # Lightning's own use of a torch API that torch deprecated; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The synthetic tasks generate examples in the training process; worker processes would not speed them up.
    r".*does not have many workers which may be a bottleneck",
    # `validate --ckpt_path` logs into a new version folder; only best_model_path matters there.
    r"The dirpath has changed from .* won't be reloaded",
)
# Lightning log lines that are noise on the machines hydra-kit runs on (CPU only, no accounts).
HARMLESS_LOG_LINES = (
    "GPU available: False, used: False",
    "TPU available: False",
    "💡 Tip: For seamless cloud logging",
    "`Trainer(val_check_interval=1)` was configured",  # a 1-step run, whose validation interval hydra-kit clamps to 1
)


class _DropLogLines:
    """A logging filter for the lines of HARMLESS_LOG_LINES."""

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(HARMLESS_LOG_LINES)


def quiet_lightning() -> None:
    """Silence the known-harmless Lightning warnings and log lines in this process (each one by its message)."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets up the log handlers that get the filter)

    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropLogLines) for f in handler.filters):
                handler.addFilter(_DropLogLines())


def run_lightning(argv: list[str]) -> int:
    """Hand a fit/validate/test/predict command to LightningCLI after checking the recipes."""
    paths = _config_paths(argv)
    check_recipes(paths, argv)
    from hydra_kit.lightning_cli import HydraCLI

    HydraCLI(args=argv)
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear down a DDP process group on every rank together, before the interpreter shuts down.

    Left to the interpreter's exit, one rank can destroy its gloo group while the other's worker threads still
    run, and the process aborts ("terminate called without an active exception", exit -6) after a good run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hydra-kit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    third_party = os.environ.get("HYDRA_KIT_NO_PLUGINS", "") not in ("1", "true", "yes")
    if "--no-plugins" in argv:
        argv.remove("--no-plugins")
        third_party = False
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from hydra_kit.checkpoint import CheckpointError
    from hydra_kit.model import NonFiniteLossError
    from hydra_kit.registry import ComponentRegistryError, configure_plugins

    configure_plugins(third_party=third_party)
    quiet_lightning()  # every command: experiments, ablations and bench train through Lightning too
    command, rest = argv[0], argv[1:]
    try:
        # C2 (packaging), temporary wiring until C1's dispatcher takes it: packaged names in --config, `recipes`.
        from hydra_kit.recipe_files import resolve_config_args  # C2

        argv = resolve_config_args(argv)  # C2
        command, rest = argv[0], argv[1:]  # C2
        if command == "recipes":  # C2
            from hydra_kit.commands.recipes import main as recipes_main  # C2

            return recipes_main(rest)  # C2
        if command == "components":
            return cmd_components(rest, third_party)
        if command == "summary":
            return cmd_summary(rest)
        if command == "generate":
            return cmd_generate(rest)
        if command == "inspect":
            from hydra_kit.inspection import main as inspect_main

            return inspect_main(rest)
        if command == "bench":
            from hydra_kit.bench import main as bench_main

            return bench_main(rest)
        if command == "ablate":
            from hydra_kit.ablate import main as ablate_main

            return ablate_main(rest)
        if command == "experiment":
            from hydra_kit.experiments import main as experiment_main

            return experiment_main(rest)
        if command in LIGHTNING_COMMANDS:
            return run_lightning(argv)
    except RecipeError as exc:
        return _fail(str(exc))
    except (CheckpointError, NonFiniteLossError) as exc:
        return _fail(str(exc))
    except ComponentRegistryError as exc:  # a packaging bug in an installed plugin: every command would fail
        hint = "" if not third_party else "; run with --no-plugins (or HYDRA_KIT_NO_PLUGINS=1) to load only hydra-kit's own components"
        return _fail(f"component plugins: {exc}{hint}")
    return _fail(f"unknown command {command!r}\n{USAGE}")


if __name__ == "__main__":
    sys.exit(main())
