"""Probe: E1's one-hop warm-up task alone with facts written relation first (r a b) instead of a r b."""
import sys, runpy
import numpy as np
from hydra_kit.data import LogicChains
from hydra_kit.data.task import Example

orig = LogicChains.generate
def generate(self, rng):
    ex = orig(self, rng)
    ids = ex.input_ids.copy()
    q = int(np.flatnonzero(ids == self.query)[0])
    nonpad = int(np.flatnonzero(ids != self.pad)[0])
    facts = ids[nonpad:q].reshape(-1, 3)
    ids[nonpad:q] = facts[:, [1, 0, 2]].reshape(-1)
    return Example(ids, ex.targets, ex.meta)
LogicChains.generate = generate
LogicChains.split_tokens = lambda self, ex: ex.input_ids
sys.argv = ["calib.py"] + sys.argv[1:]
runpy.run_path("docs/calibration/2026-12-05-distant-premise/calib.py", run_name="__main__")
