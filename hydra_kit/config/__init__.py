"""The config tier: read and check recipes once, and build every run from one set of defaults.

* :mod:`~hydra_kit.config.files`: where a ``--config`` value points (:func:`config_path`, the one place) and
  reading a YAML recipe with one-line errors.
* :mod:`~hydra_kit.config.checks`: what jsonargparse's types cannot check (model sizes, component placement,
  step limits, DDP strategy), each in one line naming the file or option.
* :mod:`~hydra_kit.config.lightning`: :class:`HydraCLI`, the LightningCLI every recipe is parsed by
  (jsonargparse is the single front end), and :func:`parse_config` / :func:`model_config` for commands that
  only need the configuration.
* :mod:`~hydra_kit.config.trainer`: :data:`TRAINER_DEFAULTS` and :func:`build_trainer`, the defaults of every
  Trainer (``fit``, ``ablate``, the experiments).
* :mod:`~hydra_kit.config.checkpoints`: whether a checkpoint fits a recipe.

The submodules that import Lightning are not imported here, so ``from hydra_kit.config import load_recipe``
stays cheap.
"""

from __future__ import annotations

from hydra_kit.config.files import config_path, config_paths, load_recipe, resolve_config_args

__all__ = ["config_path", "config_paths", "load_recipe", "resolve_config_args"]
