"""Evaluation through lm-evaluation-harness (``hydra-kit eval``, docs/eval.md).

* :mod:`.tokenizer`: text <-> ids for evaluation (UTF-8 bytes, or a HF ``tokenizer.json``).
* :mod:`.scoring`: log-likelihoods and greedy continuations under a HydraNetwork, through its recurrent state
  (torch only).
* :mod:`.lm_eval_adapter`: the harness's ``LM`` interface over those (imports ``lm_eval``: the extra ``eval``).
* :mod:`.harness`: task lookup, ``simple_evaluate``, the results table and JSON.

Nothing here is imported by ``import hydra_kit``; import the module you need.
"""
