"""A plugin module that calls sys.exit at import time, as a careless third-party package might."""

import sys

sys.exit(3)
