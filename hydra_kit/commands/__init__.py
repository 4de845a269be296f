"""The commands tier: one module per ``hydra-kit`` subcommand, each with ``main(argv) -> int``, and the dispatcher.

::

    hydra-kit fit --config recipes/full.yaml        # LightningCLI subcommands: fit, validate, test, predict
    hydra-kit components                            # discovered components with distribution and version
    hydra-kit summary --config recipes/full-29m.yaml [--json] [--seq_len 8192]
    hydra-kit inspect --ckpt_path runs/full/version_0/checkpoints/last.ckpt [--task mqar] [--examples 64]

A command parses its own options and nothing else; recipes are read and checked by the config tier
(:mod:`hydra_kit.config`), and the work is done by the library below it (:mod:`hydra_kit.ablate`,
:mod:`hydra_kit.bench`, :mod:`hydra_kit.experiments`, ...). Nothing below this package imports it.

``--no-plugins`` (or ``HYDRA_KIT_NO_PLUGINS=1``) loads only hydra-kit's own components. A user error (a
:class:`~hydra_kit.errors.RecipeError`, an unreadable checkpoint, a loss gone non-finite) is printed as one
``error:`` line with exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from hydra_kit.config.arguments import print_error
from hydra_kit.errors import RecipeError

__all__ = ["COMMANDS", "LIGHTNING_COMMANDS", "USAGE", "main"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# command -> the module under hydra_kit.commands that runs it (imported only when its command runs)
COMMANDS = {
    **{name: "lightning" for name in LIGHTNING_COMMANDS},
    "components": "components",
    "summary": "summary",
    "generate": "generate",
    "export": "export",
    "inspect": "inspect",
    "bench": "bench",
    "ablate": "ablate",
    "experiment": "experiment",
    "recipes": "recipes",
    "prepare": "prepare",
    "eval": "eval",
}
USAGE = """usage: hydra-kit [--no-plugins] COMMAND ...

commands:
  fit | validate | test | predict   train or evaluate a recipe (LightningCLI; see `hydra-kit fit --help`)
  components                        list the discovered components
  summary --config RECIPE           parameters (total, active) and FLOPs per token, per component and block
  generate --model DIR ...          stream text from an export or a checkpoint (--prompt TEXT, --top_p, --stop; --help)
  export --ckpt_path CKPT --out DIR safetensors weights + config.json + tokenizer, loadable without Lightning
  inspect --ckpt_path CKPT ...      per-block gates, LayerScale, update norms, component stats on held-out examples (--help)
  bench [--recipes A B]             tokens/s and peak memory side by side, ratios A/B (--help)
  ablate --drop NAME [--drop ...]   paired runs with and without components, table of deltas (--help)
  prepare --input PATH --out DIR    tokenise a corpus (BPE or bytes) into token shards with document ends (--help)
  experiment NAME | --list          the paper's experiments E1-E6, one command each (--seeds, --steps, --out, --size)
  recipes [--copy NAME]             list the packaged recipes, or write one out to edit (--config takes their names)
  eval --ckpt_path CKPT --tasks T   lm-evaluation-harness tasks on a checkpoint, offline; table and JSON (--help)

options:
  --no-plugins                      load only hydra-kit's own components (also HYDRA_KIT_NO_PLUGINS=1)
"""


def _fail(message: str) -> int:
    print_error(message)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hydra-kit`` console script: run one command, return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    third_party = os.environ.get("HYDRA_KIT_NO_PLUGINS", "") not in ("1", "true", "yes")
    if "--no-plugins" in argv:
        argv.remove("--no-plugins")
        third_party = False
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)} (hydra-kit --help)")
    from hydra_kit.checkpoint import CheckpointError
    from hydra_kit.config.files import resolve_config_args
    from hydra_kit.config.trainer import quiet_lightning
    from hydra_kit.model import NonFiniteLossError
    from hydra_kit.registry import ComponentRegistryError, configure_plugins

    configure_plugins(third_party=third_party)
    quiet_lightning()  # every command: experiments, ablations and bench train through Lightning too
    module = importlib.import_module(f"hydra_kit.commands.{COMMANDS[command]}")
    try:
        # Recipe options (--config, --recipe, --recipes) may name a packaged recipe: every command gets files.
        argv = resolve_config_args(argv)
        rest = argv[1:]
        if command in LIGHTNING_COMMANDS:
            return int(module.main(argv))
        if command == "components":
            return int(module.main(rest, third_party=third_party))
        return int(module.main(rest))
    except (RecipeError, CheckpointError, NonFiniteLossError) as exc:
        return _fail(str(exc))
    except ComponentRegistryError as exc:  # a packaging bug in an installed plugin: every command would fail
        hint = "" if not third_party else "; run with --no-plugins (or HYDRA_KIT_NO_PLUGINS=1) to load only hydra-kit's own components"
        return _fail(f"component plugins: {exc}{hint}")
