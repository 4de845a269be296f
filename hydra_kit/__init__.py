"""hydra-kit: build, train and measure Hydra-style hybrid long-context language models.

The core knows the component contract (:mod:`hydra_kit.protocol`), discovery (:mod:`hydra_kit.registry`), the
block and model assembly, data, callbacks and the CLI; it never imports a concrete component.
"""

from hydra_kit.protocol import (
    ComponentContext,
    ComponentOutput,
    ComponentPath,
    RouterComponent,
    RouterOutput,
    TriPathComponent,
)

__version__ = "0.1.0"

__all__ = [
    "ComponentContext",
    "ComponentOutput",
    "ComponentPath",
    "RouterComponent",
    "RouterOutput",
    "TriPathComponent",
    "__version__",
]
