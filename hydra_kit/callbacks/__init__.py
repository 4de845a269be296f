"""Lightning callbacks for component studies: curriculum stages, knock-outs, ablation checks, throughput.

One callback family per module (``curriculum``, ``knockout``, ``throughput``, ``display``); recipes name them by
their short path, e.g. ``hydra_kit.callbacks.Curriculum``.

* :class:`Curriculum` activates a model's parts in stages (docs/design.md: "ablations and curriculum stages are
  Lightning callbacks"). The paper (arXiv 2508.15099, v1/v2) only says it "outline[s] a staged curriculum
  intended to stably activate the parts"; the number of stages and their contents are not recoverable, so a
  curriculum is whatever the recipe says (``recipes/curriculum.yaml`` is one reading). Recipe form::

      trainer:
        callbacks:
          - class_path: hydra_kit.callbacks.Curriculum
            init_args:
              stages:
                - {name: backbone, at_step: 0, disable: [sga, pkm], data: {num_pairs: 2, num_queries: 2}}
                - {name: attention, at_step: 200, enable: [sga], data: {num_pairs: 4}}
                - {name: memory, when: {metric: val/acc, above: 0.5}, enable: [pkm], lr_scale: 0.5}

* :class:`KnockOut` switches component instances off during validation/test only (no retraining).
* :class:`Ablation` checks that instances removed with ``model.dropped`` really are gone, and says so.
* :class:`Throughput` measures tokens per second of training and validation batches.
* :class:`Diagnostics` logs gates, LayerScale, update and gradient norms and component statistics per block
  every N steps (``diag/block<i>.<instance>/<stat>``); ``hydra-kit fit`` adds it (``--diagnostics.every_n_steps``).
* :class:`StepProgressBar` and :class:`ParameterSummary` are what ``hydra-kit fit`` shows (added by the CLI).

Callbacks reach a model's component instances only through the network's instance API (:func:`network_of`,
:class:`hydra_kit.network.HydraNetwork`), and data modules through :mod:`hydra_kit.data.protocol`.
"""

from hydra_kit.callbacks.curriculum import Curriculum, StageAware, check_recipe_callbacks
from hydra_kit.callbacks.diagnostics import Diagnostics
from hydra_kit.callbacks.display import ParameterSummary, StepProgressBar
from hydra_kit.callbacks.instances import instance_names, instance_parameters, network_of
from hydra_kit.callbacks.knockout import Ablation, KnockOut
from hydra_kit.callbacks.throughput import Throughput

__all__ = [
    "Ablation",
    "Curriculum",
    "Diagnostics",
    "KnockOut",
    "ParameterSummary",
    "StageAware",
    "StepProgressBar",
    "Throughput",
    "check_recipe_callbacks",
    "instance_names",
    "instance_parameters",
    "network_of",
]
