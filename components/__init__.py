"""First-party hydra-kit components, installed as ``hydra_kit.components``.

Each module holds one component. They are registered in the entry-point group ``hydra_kit.components`` by
hydra-kit's own ``pyproject.toml``, exactly as a third-party package registers its own; the core never imports
this package directly.
"""
