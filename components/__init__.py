"""First-party hydra-kit components, installed as ``hydra_kit.components``.

Each module holds one component. They are registered in the entry-point group ``hydra_kit.components`` by
hydra-kit's own ``pyproject.toml``, exactly as a third-party package registers its own; the core never imports
this package directly.

This folder is the checkout's top-level ``components/``, which an editable install maps to
``hydra_kit.components`` by absolute path. Importing it checks that it belongs to the same source tree as the
running ``hydra_kit`` (``hydra_kit.package_data.check_same_tree``), so one checkout's code never silently runs
another checkout's components.
"""

from pathlib import Path

from hydra_kit.package_data import check_same_tree

check_same_tree(__name__, Path(__file__).parent)
