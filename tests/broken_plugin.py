"""A plugin module that fails at import time, as a broken third-party package would."""

raise ImportError("this plugin needs a package that is not installed (simulated)")
