"""The ``retrieval`` family: the paper's single retrieval layer (model.py) and its protocol (PAPER §2.3-2.4).

Adam at a constant rate; the loss ½‖ŷ − onehot(target)‖² of one query per training sequence; evaluation on the
task's evaluation set (every distinct key of each sequence), with the protocol options of ``TrainConfig``
(train.py's docstring); solved when the eval loss reaches ``stop_loss``; the stability and contrast diagnostics
(diagnostics.py) at every evaluation.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import RunConfig
from ..memories import memory_options
from ..model import RetrievalModel, retrieval_loss
from . import Evaluation, memory_blocker

# Streams of randomness of one run, derived from its seed so that none overlaps another. The evaluation sets
# (one, or a fresh one at every evaluation) all come from _EVAL, so they never move the training batches.
_INIT, _TRAIN, _EVAL, _PHI = 0, 1, 2, 3


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + stream)


def build_model(cfg: RunConfig, num_values: int) -> RetrievalModel:
    """The run's model, initialised from its seed without touching the caller's global RNG."""
    kwargs = memory_options(cfg.model.memory, redraw=cfg.model.redraw)  # FAVOR+ takes it; others do not
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + _INIT)  # nn.Linear draws its init from the global RNG
        model = RetrievalModel(cfg.task.kwargs()["num_keys"], cfg.model.memory, d_key=cfg.model.d_key,
                               num_values=num_values, embed_factor=cfg.model.embed_factor, **kwargs)
    phi = getattr(model.memory, "phi", None)
    if phi is not None:
        phi.seed(cfg.seed * 1000 + _PHI)
    return model


def chunk_weights(mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each real query's weight in the official eval loss, the mean of per-chunk means (PAPER §2.4).

    Each row's real queries, in order, fall into chunks of ``chunk`` (the last one shorter); a query in a chunk
    of n weighs 1/n, padding 0, so the weights sum to the number of chunks and Σ w·ℓ / Σ w is the mean of the
    chunk means. mask (N, Q) bool -> (N, Q) float.
    """
    rank = mask.long().cumsum(1) - 1  # (N, Q): where each real query stands among its row's real queries
    start = torch.div(rank, chunk, rounding_mode="floor") * chunk  # first rank of its chunk
    size = (mask.sum(1, keepdim=True) - start).clamp(1, chunk)  # (N, Q): its chunk's length
    return torch.where(mask, 1.0 / size, 0.0)


def _read_in_chunks(model: RetrievalModel, ev, chunk: int) -> torch.Tensor:
    """ŷ (N, Q, V) from one model call per chunk of ``chunk`` real queries of one sequence, as the official
    evaluation calls it (a FAVOR+ map that redraws on every call draws a new Ω for each); padding reads 0."""
    y = None
    for n in range(ev.keys.shape[0]):
        real = ev.mask[n].nonzero()[:, 0]  # (q_n,) positions of the sequence's real queries
        for idx in real.split(chunk):
            y_c = model(ev.keys[n:n + 1], ev.values[n:n + 1], ev.queries[n:n + 1, idx])[0]  # (len(idx), V)
            if y is None:
                y = y_c.new_zeros(*ev.queries.shape, y_c.shape[-1])
            y[n, idx] = y_c
    return y


@torch.no_grad()
def evaluate(model: RetrievalModel, ev, chunk: int = 32, chunk_mean: bool = False,
             chunk_calls: bool = False) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, ŷ (N, Q, V)) on an EvalSet (ids (N, L), queries (N, Q)).

    By default every sequence's memory is built once, in one call for the whole set, and read at all its
    queries; the loss is the plain mean over real queries. ``chunk_calls``: one call per chunk of ``chunk``
    queries of one sequence (the official code's; a FAVOR+ Ω per chunk). ``chunk_mean``: the loss is the mean
    of the chunk means (``chunk_weights``). The accuracy is always the plain fraction of real queries right.
    """
    model.eval()
    y = _read_in_chunks(model, ev, chunk) if chunk_calls else model(ev.keys, ev.values, ev.queries)  # (N, Q, V)
    weights = chunk_weights(ev.mask, chunk) if chunk_mean else ev.mask
    loss = retrieval_loss(y, ev.targets, weights).item()
    acc = ((y.argmax(-1) == ev.targets) & ev.mask).sum().item() / max(int(ev.mask.sum()), 1)
    model.train()
    return loss, acc, y


class RetrievalFamily:
    name = "retrieval"

    def build(self, cfg: RunConfig, task: Any) -> RetrievalModel:
        return build_model(cfg, task.num_values)

    def optimizer(self, cfg: RunConfig, model: RetrievalModel):
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr), None

    def clip(self, cfg: RunConfig, model: RetrievalModel) -> None:
        pass  # the paper's protocol clips nothing

    def train_loss(self, model: RetrievalModel, batch) -> torch.Tensor:
        y = model(batch.keys, batch.values, batch.query[:, None])[:, 0]  # (B, V)
        return retrieval_loss(y, batch.target)

    def group_blocker(self, model: RetrievalModel) -> str | None:
        """Why runs of this model cannot share one memory call (group.py), or None where they can: the memory
        must hold nothing of a run's own (no parameters, no buffers, no random draws of its feature map)."""
        return memory_blocker(model.memory)

    def check_batch(self, model: RetrievalModel, batch) -> None:
        """Raise where a batch holds an id outside the model's tables: alone, the gather would raise; in a group,
        it would read another run's rows."""
        for name, ids, n in (("keys", batch.keys, model.num_keys), ("query", batch.query, model.num_keys),
                             ("values", batch.values, model.num_values)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
                raise ValueError(f"{name} ids must lie in [0, {n}), got [{int(ids.min())}, {int(ids.max())}]")

    def group_loss(self, models: list[RetrievalModel], batches: list) -> torch.Tensor:
        """The training losses (G,) of G runs of one shape, each on its own batch, in one memory call.

        Each run's front end (embedding, key, gate and query projections) is stacked along a leading run axis
        and applied as batched matmuls and gathers; the memory then reads G·B sequences at once. Each loss
        depends on its own run's parameters only, so the gradient of their sum is each run's own gradient.
        """
        m0 = models[0]
        G, V, S = len(models), m0.num_values, m0.num_keys
        keys, values = torch.stack([b.keys for b in batches]), torch.stack([b.values for b in batches])  # (G, B, L)
        query, target = torch.stack([b.query for b in batches]), torch.stack([b.target for b in batches])  # (G, B)
        B, L = keys.shape[1:]
        names = ("W_k", *(f"W_g.{g}" for g in m0.gate_names))
        lins = [[m.get_submodule(n) for m in models] for n in names]
        weight = torch.cat([torch.stack([lin.weight for lin in per]) for per in lins], 1)  # (G, out, V+E)
        bias = torch.cat([torch.stack([lin.bias for lin in per]) for per in lins], 1)  # (G, out)
        emb = torch.stack([m.embedding for m in models])  # (G, S, E)
        w_val = weight[:, :, :V].transpose(1, 2).reshape(G * V, -1)  # (G·V, out)
        w_key = torch.baddbmm(bias[:, None, :], emb, weight[:, :, V:].transpose(1, 2)).reshape(G * S, -1)
        run = torch.arange(G, device=keys.device)[:, None, None]  # each run's rows in the stacked tables
        proj = (w_val.index_select(0, (values + run * V).reshape(-1))
                + w_key.index_select(0, (keys + run * S).reshape(-1))).reshape(G * B, L, -1)
        w_q = torch.stack([m.W_q.weight for m in models]).transpose(1, 2)  # (G, E, K)
        b_q = torch.stack([m.W_q.bias for m in models])[:, None, :]  # (G, 1, K)
        at = (query + run[:, :, 0] * S).reshape(-1)
        if B > S:  # as RetrievalModel.inputs: project the S embedding rows once, then gather
            q = torch.baddbmm(b_q, emb, w_q).reshape(G * S, -1).index_select(0, at).reshape(G, B, -1)
        else:
            q = torch.baddbmm(b_q, emb.reshape(G * S, -1).index_select(0, at).reshape(G, B, -1), w_q)  # (G, B, K)
        k, v, betas, q, gates = m0.split_inputs(proj, values.reshape(G * B, L), q.reshape(G * B, 1, -1))
        y = m0.memory(k, v, betas, q, **gates)[:, 0].reshape(G, B, V)
        err = y - torch.nn.functional.one_hot(target, V).to(y.dtype)
        return (0.5 * (err * err).sum(-1)).mean(-1)  # (G,): each run's retrieval_loss

    def evaluate(self, model: RetrievalModel, ev, cfg: RunConfig) -> Evaluation:
        tc = cfg.train
        loss, acc, y = evaluate(model, ev, chunk=tc.batch_size, chunk_mean=tc.option("eval_mean") == "chunk",
                                chunk_calls=tc.option("eval_omega") == "chunk")
        return Evaluation(loss=loss, acc=acc, state=y)

    def solved(self, ev: Evaluation, tc) -> bool:
        return ev.loss <= tc.stop_loss

    def final(self, model, task, cfg, generator) -> list[tuple]:
        return []

    def row(self, model: RetrievalModel, cfg: RunConfig, task: Any) -> dict[str, Any]:
        try:
            state = int(model.memory.state_size(cfg.model.d_key, task.num_values, task.seq_len))
        except NotImplementedError:
            state = None
        return {"num_keys": task.num_keys, "seq_len": task.seq_len, "d_key": cfg.model.d_key,
                "d_dot": model.memory.d_dot(cfg.model.d_key), "state_size": state, "family": "retrieval",
                "lr": cfg.train.lr, "eval_seq_len": task.eval_seq_len}

    def tracker(self, cfg: RunConfig):
        if not cfg.train.diagnostics:
            return None
        from ..diagnostics import StabilityTracker

        return StabilityTracker(max_positions=cfg.train.diag_positions)
