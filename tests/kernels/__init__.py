"""Tests of the optional GPU kernels (a package, so that its conftest does not shadow tests/conftest.py)."""
