"""Model families: what the one training loop (train.py) needs to know about a kind of model.

A family builds its model from a run's config and task, makes its optimizer, gives the training loss of a batch,
and evaluates (loss, accuracy and the family's own records). The loop knows nothing else: its protocol
(evaluation cadence, stop rule, patience, divergence, records) is the same for every family.

- ``retrieval`` (families/retrieval.py): the paper's single retrieval layer and protocol, number for number.
- ``lm`` (families/lm.py): the causal language model of the token-stream tasks (``mqar`` and its variants).

An experiment selects its family with ``[model] kind``; the default is ``retrieval``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig, TrainConfig

KINDS = ("retrieval", "lm")


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch or evaluation set (a dataclass of tensors) with every tensor on ``device``; itself on the CPU."""
    import dataclasses

    import torch

    if device.type == "cpu":
        return batch
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True)
                                         for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def memory_blocker(mem) -> str | None:
    """Why runs cannot share calls of the memory ``mem`` (group.py), or None where they can: it must hold nothing
    of a run's own (no parameters, no buffers, no random draws of its feature map)."""
    from ..feature_maps import FeatureMap

    phi = getattr(mem, "phi", None)
    seeded = phi is not None and (type(phi).seed is not FeatureMap.seed
                                  or type(phi).begin_call is not FeatureMap.begin_call)
    if seeded or any(True for _ in mem.parameters()) or any(True for _ in mem.buffers()):
        return "its memory holds a state of its own (parameters, buffers or random draws)"
    return None


@dataclass
class Evaluation:
    """One evaluation: the loss and accuracy the protocol uses, and what the family records beside them.

    ``curves``: extra (split, metric, value) rows for the curves table at this step; ``diagnostics``: (position,
    metric, value) rows for the diagnostics table at this step; ``state``: what the family's diagnostics need
    (e.g. the retrieval model's reads), kept only until the next evaluation."""

    loss: float
    acc: float
    curves: list[tuple[str, str, float]] = field(default_factory=list)
    diagnostics: list[tuple[int | None, str, float]] = field(default_factory=list)
    state: Any = None


class Family(Protocol):
    name: str

    def build(self, cfg: RunConfig, task: Any) -> torch.nn.Module: ...

    def optimizer(self, cfg: RunConfig, model: torch.nn.Module) -> tuple[Any, Any]:
        """(optimizer, scheduler or None); the scheduler steps once per training step."""

    def clip(self, cfg: RunConfig, model: torch.nn.Module) -> None:
        """Clip the gradients before the optimizer step (or nothing)."""

    def train_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, eval_set: Any, cfg: RunConfig) -> Evaluation: ...

    def solved(self, ev: Evaluation, tc: TrainConfig) -> bool:
        """Whether the run has met its stop criterion."""

    def final(self, model: torch.nn.Module, task: Any, cfg: RunConfig, generator: Any) -> list[tuple]:
        """(position, metric, value) diagnostics rows made once, after training (extrapolation, ...)."""

    def row(self, model: torch.nn.Module, cfg: RunConfig, task: Any) -> dict[str, Any]:
        """The runs-table columns the family fills: num_keys, seq_len, d_key, d_dot, state_size, ..."""

    def tracker(self, cfg: RunConfig) -> Any:
        """The family's diagnostics tracker, or None."""


def family(kind: str) -> Family:
    """The family named ``kind`` (``[model] kind``)."""
    if kind == "retrieval":
        from .retrieval import RetrievalFamily

        return RetrievalFamily()
    if kind == "lm":
        from .lm import LMFamily

        return LMFamily()
    raise ValueError(f"model.kind: unknown model family {kind!r} (known: {', '.join(KINDS)})")
