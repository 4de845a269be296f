"""The ``hydra-kit`` console script (``hydra_kit.cli:main``): the dispatcher of :mod:`hydra_kit.commands`.

``python -m hydra_kit.cli ARGS`` runs it as well.
"""

from __future__ import annotations

import sys

from hydra_kit.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
