"""hydra-kit's recipes, installed as the package data of ``hydra_kit.recipes`` (this file makes the folder a package).

List them with ``hydra-kit recipes``, name one with ``--config NAME`` (``full``, ``full-29m``,
``experiments/smoke``) and copy one out to edit with ``hydra-kit recipes --copy NAME``; hydra_kit/recipe_files.py
finds them through importlib.resources, in a checkout and in an installed wheel alike.
"""
