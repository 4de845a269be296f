"""Datasets of the tiny local lm-eval tasks: the JSONL files beside this module, read without the network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def _read(name: str) -> datasets.Dataset:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.Dataset.from_list(rows)


def choice(**_: Any) -> dict[str, datasets.Dataset]:
    """Multiple-choice questions: question, choices, answer (the index of the right choice)."""
    return {"test": _read("choice.jsonl")}


def perplexity(**_: Any) -> dict[str, datasets.Dataset]:
    """Short documents scored whole: text."""
    return {"test": _read("perplexity.jsonl")}


def generation(**_: Any) -> dict[str, datasets.Dataset]:
    """Prompts to continue up to the end of the line: prompt, answer."""
    return {"test": _read("generation.jsonl")}
