"""Sample data shipped with hydra-kit, installed as ``hydra_kit.sample_data`` (this file makes the folder a package).

``wikitext-2-sample/`` is the default text of recipes/text.yaml; its README.md gives the source, the attribution
and the license (CC BY-SA 3.0, not the Apache-2.0 of the code). hydra_kit/data/text.py finds it through
importlib.resources when a recipe names ``data/wikitext-2-sample/...`` and no such file exists from the working
folder.
"""
