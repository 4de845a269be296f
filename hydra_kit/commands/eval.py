"""``hydra-kit eval``: lm-evaluation-harness tasks on a checkpoint, offline; prints the table and writes JSON.

::

    hydra-kit eval --ckpt_path runs/text/version_0/checkpoints/last.ckpt --tasks hellaswag,lambada_openai,wikitext
    hydra-kit eval --ckpt_path CKPT --tasks my_task --include_path my_tasks/ --limit 50 --out results/eval.json

Nothing is downloaded: the Hugging Face offline switches are set before the harness is imported, so every
task's data must already be in the local datasets cache or in a local task (docs/eval.md). The tokenizer is
``--tokenizer`` when given, else the ``tokenizer.json`` of the export folder (``--model``) or of the shard
folder the checkpoint was trained on, else UTF-8 bytes (vocabularies of 256 and more).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra_kit.config.arguments import ArgumentParser
from hydra_kit.errors import RecipeError

if TYPE_CHECKING:
    from hydra_kit.network import HydraNetwork

__all__ = ["OFFLINE_ENVIRONMENT", "main"]

# Read by huggingface_hub, datasets, evaluate and transformers when they are imported: set before lm_eval is.
BYTE_VOCABULARY = 257  # the most ids a byte-level model uses: 256 bytes and prepare's end-of-document token
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _limit(text: str) -> int | float:
    """``--limit``: a count of examples per task (an integer >= 1) or a share of them (0 < x < 1)."""
    try:
        value = float(text)
    except ValueError:
        raise RecipeError(f"eval: --limit: expected a number of examples (>= 1) or a share (0 < x < 1), got {text!r}") from None
    if value >= 1 and value.is_integer():
        return int(value)
    if 0 < value < 1:
        return value
    raise RecipeError(f"eval: --limit: expected a number of examples (an integer >= 1) or a share (0 < x < 1), got {text!r}")


def _training_data_path(ckpt_path: str, checkpoint: dict[str, Any]) -> str | None:
    """The data folder the checkpoint was trained on: its data module's ``path``, or the run's saved config.yaml's."""
    data = checkpoint.get("datamodule_hyper_parameters")
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        return str(data["path"])
    folder = Path(ckpt_path).resolve().parent
    run_config = folder.parent / "config.yaml"  # runs/<name>/version_<n>/{config.yaml, checkpoints/<file>}
    if folder.name != "checkpoints" or not run_config.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(run_config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    init_args = (config.get("data") or {}).get("init_args") if isinstance(config, dict) else None
    path = init_args.get("path") if isinstance(init_args, dict) else None
    return path if isinstance(path, str) else None


def _shard_tokenizer(ckpt_path: str, checkpoint: dict[str, Any]) -> str | None:
    """The tokenizer.json beside the token shards the checkpoint was trained on, when that folder is here."""
    folder = _training_data_path(ckpt_path, checkpoint)
    if folder is not None and (Path(folder).expanduser() / "tokenizer.json").is_file():
        return str(Path(folder).expanduser() / "tokenizer.json")
    return None


def _load(args: Any) -> tuple[HydraNetwork, str | None, str]:
    """The HydraNetwork to evaluate, the tokenizer its files point to (None: bytes), and its name."""
    if args.ckpt_path is not None:
        from hydra_kit.checkpoint import load_model

        model, checkpoint = load_model(args.ckpt_path)
        return model.network, _shard_tokenizer(args.ckpt_path, checkpoint), args.ckpt_path
    from hydra_kit.network import HydraNetwork

    folder = Path(args.model)
    if not folder.is_dir():
        raise RecipeError(f"eval: --model {args.model!r}: no such folder (an export folder holds model.safetensors and config.json)")
    tokenizer = folder / "tokenizer.json"
    return HydraNetwork.from_pretrained(folder), str(tokenizer) if tokenizer.is_file() else None, str(folder)


def main(argv: list[str]) -> int:
    """Evaluate a checkpoint on lm-evaluation-harness tasks, offline (docs/eval.md)."""
    parser = ArgumentParser(prog="hydra-kit eval", description=main.__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="checkpoint written by hydra-kit fit")
    source.add_argument("--model", help="export folder written by hydra-kit export (model.safetensors, config.json)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names (globs allowed), or task YAML files")
    parser.add_argument("--limit", type=str, default=None, help="at most N examples per task (or a share 0 < x < 1)")
    parser.add_argument("--include_path", action="append", default=[], help="folder of extra task YAML files (repeatable)")
    parser.add_argument("--out", default="eval-results.json", help="JSON results file (default: eval-results.json)")
    parser.add_argument("--tokenizer", default=None, help="'bytes', or a tokenizer.json (or its folder) to use instead of the model's")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--bootstrap_iters", type=int, default=100000, help="bootstrap resamples for standard errors (0: none)")
    parser.add_argument("--chunk_size", type=int, default=None, help="longest piece one forward reads (default: the model's max_seq_len, or all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise RecipeError("eval: --tasks: give at least one task name (e.g. --tasks hellaswag,lambada_openai)")
    limit = None if args.limit is None else _limit(args.limit)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise RecipeError(f"eval: --num_fewshot: expected an integer >= 0, got {args.num_fewshot}")
    if args.bootstrap_iters < 0:
        raise RecipeError(f"eval: --bootstrap_iters: expected an integer >= 0, got {args.bootstrap_iters}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise RecipeError(f"eval: --chunk_size: expected an integer >= 1, got {args.chunk_size}")
    if Path(args.out).is_dir():
        raise RecipeError(f"eval: --out {args.out!r} is a folder; give a file name such as {os.path.join(args.out, 'eval.json')!r}")

    os.environ.update(OFFLINE_ENVIRONMENT)
    from hydra_kit.evaluation.harness import format_results, run_tasks, write_results
    from hydra_kit.evaluation.lm_eval_adapter import HydraEvalLM
    from hydra_kit.evaluation.tokenizer import load_tokenizer

    network, model_tokenizer, name = _load(args)
    spec = args.tokenizer if args.tokenizer is not None else model_tokenizer
    if spec is None and network.vocab_size > BYTE_VOCABULARY:
        # Bytes need 256 ids (257 with prepare's end-of-document token): a larger vocabulary came with a tokenizer.
        raise RecipeError(
            f"eval: {name}: the model has {network.vocab_size} ids, more than bytes use, and its tokenizer.json was not found; "
            "give --tokenizer PATH (the tokenizer.json of its training data), or --tokenizer bytes"
        )
    tokenizer = load_tokenizer(spec, network.vocab_size)
    lm = HydraEvalLM(network, tokenizer, chunk_size=args.chunk_size, name=name)
    results = run_tasks(
        lm, tasks, include_path=args.include_path, limit=limit, num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters, seed=args.seed
    )
    print(format_results(results))
    path = write_results(results, args.out)
    print(f"results written to {path}", file=sys.stderr)
    return 0
