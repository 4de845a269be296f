"""The one door from the callbacks to a model's component instances: the network's public instance API.

Callbacks never write block internals. They get the :class:`~hydra_kit.network.HydraNetwork` a HydraLM trains
(:func:`network_of`) and use its instance API: ``disable``/``enable``/``set_knocked_out`` (knock-outs),
``freeze``/``unfreeze``, ``instance_names``, ``router_names``, ``knocked_out`` and ``instance_parameters``.
"""

from __future__ import annotations

from torch import nn

from hydra_kit.network import HydraNetwork


def network_of(model: nn.Module) -> HydraNetwork:
    """The HydraNetwork a HydraLM trains (or ``model`` itself when it is one); TypeError for other modules."""
    network = model if isinstance(model, HydraNetwork) else getattr(model, "network", None)
    if not isinstance(network, HydraNetwork):
        raise TypeError(f"this callback needs a hydra_kit HydraLM, got {type(model).__name__}")
    return network


def instance_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """(all instance names, router instance names) of a HydraLM; TypeError for other modules."""
    network = network_of(model)
    return set(network.instance_names), set(network.router_names)


def instance_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every parameter of instance ``name`` in every block: its weights, its LayerScale g, or the router's.

    An instance the model does not hold (an ablated one) has none.
    """
    network = network_of(model)
    return network.instance_parameters(name) if name in network.instance_names else []
