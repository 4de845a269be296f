"""What a data module must offer HydraLM and the curriculum: two written protocols and the checks against them.

Any ``LightningDataModule`` can feed :class:`hydra_kit.model.HydraLM` if it implements :class:`TokenData`:

* batches are dicts with ``input_ids`` (B, L) int64 and ``targets`` (B, L) int64, the target token at scored
  positions and ``IGNORE_INDEX`` (-100) elsewhere;
* ``vocab_size``: the number of token ids the data uses (the model's ``vocab_size`` must cover it);
* ``seq_len``: the longest sequence its batches hold now (checked against the components' ``max_seq_len``);
* optionally ``bytes_per_token``: bytes per token of byte-level text; when set (not None), the model also logs
  validation bits per byte (``val/bpb``).

A data module that a :class:`~hydra_kit.callbacks.Curriculum` stage changes (``data: {...}``) also implements
:class:`CurriculumData`. :class:`~hydra_kit.data.SyntheticDataModule` implements both,
:class:`~hydra_kit.data.TextDataModule` the first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from hydra_kit.recipe import RecipeError


@runtime_checkable
class TokenData(Protocol):
    """A data module HydraLM can train on (see the module docstring for the batch format)."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids the data uses."""
        ...

    @property
    def seq_len(self) -> int:
        """Length of the sequences the data makes now."""
        ...


@runtime_checkable
class CurriculumData(Protocol):
    """A data module whose task a curriculum stage may change (its length or difficulty)."""

    @property
    def task(self) -> Any:
        """The task in force now (its class name appears in error messages)."""
        ...

    def task_params(self) -> dict[str, Any]:
        """The task's adjustable parameters and their current values."""
        ...

    def task_with(self, values: Mapping[str, Any]) -> Any:
        """The task with ``values`` changed (not applied); raises ValueError for invalid values."""
        ...

    def set_task_params(self, values: Mapping[str, Any], rehearse: tuple[Mapping[str, Any], float] | None = None) -> None:
        """Apply ``values`` from the next example drawn on; ``rehearse``: (earlier values, share of batches)."""
        ...


# The members each protocol asks for, by name: a runtime isinstance() check says only yes or no.
TOKEN_DATA_MEMBERS = ("vocab_size", "seq_len")
CURRICULUM_DATA_MEMBERS = ("task", "task_params", "task_with", "set_task_params")


def _missing(obj: Any, members: tuple[str, ...]) -> list[str]:
    return [name for name in members if not hasattr(obj, name) or (name.startswith(("task_", "set_")) and not callable(getattr(obj, name)))]


def check_token_data(datamodule: Any, who: str = "HydraLM") -> TokenData:
    """``datamodule`` as :class:`TokenData`, or a one-line error naming what it lacks.

    Raises:
        RecipeError: ``data: <class> lacks vocab_size, seq_len that HydraLM needs (hydra_kit.data.TokenData)``.
    """
    missing = _missing(datamodule, TOKEN_DATA_MEMBERS)
    if missing:
        raise RecipeError(
            f"data: {type(datamodule).__name__} lacks {', '.join(missing)} that {who} needs (the protocol "
            f"hydra_kit.data.TokenData: vocab_size and seq_len; see hydra_kit/data/protocol.py)"
        )
    return datamodule  # type: ignore[no-any-return]


def check_curriculum_data(datamodule: Any, who: str = "Curriculum") -> CurriculumData:
    """``datamodule`` as :class:`CurriculumData`, or a one-line error naming what it lacks.

    Raises:
        RecipeError: naming the data module's class and the missing members.
    """
    missing = _missing(datamodule, CURRICULUM_DATA_MEMBERS)
    if missing:
        raise RecipeError(
            f"{who}: a stage sets data, but the data module {type(datamodule).__name__} has no curriculum hook "
            f"(lacks {', '.join(missing)} of hydra_kit.data.CurriculumData, as in hydra_kit.data.SyntheticDataModule)"
        )
    return datamodule  # type: ignore[no-any-return]
