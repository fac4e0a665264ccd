"""The ``lm`` family: a small causal language model (lm.py) learning a token-stream recall task (tasks/stream.py).

- Loss: cross-entropy at the query positions only (every other target is -100); the logits are computed at
  those positions only, so a large vocabulary costs nothing at the filler positions.
- Optimizer: AdamW (``weight_decay``), a linear warm-up over the first ``warmup`` fraction of ``max_steps`` and
  then a cosine decay to 0 at ``max_steps`` (``schedule = "cosine"``) or a constant rate (``"constant"``), and the
  gradient norm clipped to ``grad_clip`` (0 = off).
- Evaluation: accuracy (the fraction of query positions whose arg-max is the target) and loss on the run's
  evaluation set, in chunks of ``batch_size`` sequences; accuracy per slice: by the gap between a key's binding and
  its query (``acc_by_gap``, bins [2, 4), [4, 8), ... by their lower edge) and by the query's position
  (``acc_by_position``, bins of an eighth of the sequence by their first position).
- Stop: the run is solved when the eval accuracy reaches ``stop_acc``; patience counts evaluations without a new
  best eval loss (a loss can improve through a plateau of accuracy, as MQAR's often does before it is learnt).
- After training: the accuracy at evaluation lengths doubling from the training length up to ``eval_seq_len``
  (``acc_by_length``), and the per-layer, per-head diagnostics of each memory (contrast, interference, state and
  normaliser growth) on a few evaluation sequences, named ``L<layer>H<head>.<metric>``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import RunConfig
from ..lm import IGNORE_INDEX, CausalLM, lm
from ..memories import memory_options
from . import Evaluation, memory_blocker, to_device

_EVAL_CHUNK_TOKENS = 1 << 16  # at most this many tokens per evaluation forward


def query_logits(model: CausalLM, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the query positions only: tokens (B, T), mask (B, T) bool -> (n, vocab), row order of
    ``mask.nonzero()``. Equal to ``model(tokens)[mask]`` without the (B, T, vocab) tensor."""
    return model(tokens, mask=mask)


def _linear(x: torch.Tensor, lins: list[torch.nn.Linear]) -> torch.Tensor:
    """Each run's linear layer on its own rows: x (G, N, in) -> (G, N, out)."""
    w = torch.stack([lin.weight for lin in lins]).transpose(1, 2)  # (G, in, out)
    if lins[0].bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(torch.stack([lin.bias for lin in lins])[:, None, :], x, w)


def _norm(x: torch.Tensor, norms: list[torch.nn.LayerNorm]) -> torch.Tensor:
    """Each run's LayerNorm on its own rows: x (G, N, D)."""
    y = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=norms[0].eps)
    return torch.addcmul(torch.stack([n.bias for n in norms])[:, None, :], y,
                         torch.stack([n.weight for n in norms])[:, None, :])


def _conv(x: torch.Tensor, convs: list[torch.nn.Conv1d], B: int, T: int) -> torch.Tensor:
    """Each run's causal depthwise convolution: x (G, B·T, D) -> (G, B·T, D), as one convolution of G·D
    channels."""
    G, _, D = x.shape
    k = convs[0].kernel_size[0]
    inp = x.reshape(G, B, T, D).permute(1, 0, 3, 2).reshape(B, G * D, T)
    w = torch.stack([c.weight for c in convs]).reshape(G * D, 1, k)
    b = torch.stack([c.bias for c in convs]).reshape(G * D)
    y = torch.nn.functional.conv1d(inp, w, b, padding=k - 1, groups=G * D)[..., :T]  # (B, G·D, T)
    return y.reshape(B, G, D, T).permute(1, 0, 3, 2).reshape(G, B * T, D)


class LMFamily:
    name = "lm"

    def build(self, cfg: RunConfig, task: Any) -> CausalLM:
        m = cfg.model
        kwargs = memory_options(m.memory, redraw=m.redraw)  # FAVOR+ takes it; others do not
        return lm(m.memory, vocab_size=task.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                  n_heads=m.n_heads, conv=m.conv, mlp_ratio=m.mlp_ratio, seed=cfg.seed, **kwargs)

    def optimizer(self, cfg: RunConfig, model: CausalLM):
        tc = cfg.train
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        warm = int(round(tc.warmup * tc.max_steps))

        def factor(step: int) -> float:  # the rate of the optimizer step that follows ``step`` steps taken
            if step < warm:
                return (step + 1) / warm
            if tc.schedule == "cosine":  # from the peak, just after the warm-up, down to 0 at the last step
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm + 1) / max(1, tc.max_steps - warm))))
            return 1.0

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def clip(self, cfg: RunConfig, model: CausalLM) -> None:
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)

    def train_loss(self, model: CausalLM, batch) -> torch.Tensor:
        mask = batch.targets != IGNORE_INDEX  # (B, T)
        return torch.nn.functional.cross_entropy(query_logits(model, batch.tokens, mask), batch.targets[mask])

    def group_blocker(self, model: CausalLM) -> str | None:
        """Why runs of this model cannot train as one stacked model (group.py), or None where they can."""
        for mem in model.memories:
            why = memory_blocker(mem)
            if why is not None:
                return why
        return None

    def check_batch(self, model: CausalLM, batch) -> None:
        """Raise where a batch holds a token outside the vocabulary (in a group it would read another run's
        embedding rows)."""
        model._check_tokens(batch.tokens)

    def group_loss(self, models: list[CausalLM], batches: list) -> torch.Tensor:
        """The training losses (G,) of G runs of one shape, each on its own batch, the memory of each layer read
        for all G·B sequences in one call. Each run's embedding, norms, convolution, projections and MLP are
        stacked along a leading run axis (batched matmuls); its output head and loss are its own. Each loss
        depends on its own run's parameters only."""
        m0, G = models[0], len(models)
        tokens = torch.stack([b.tokens for b in batches])  # (G, B, T)
        targets = torch.stack([b.targets for b in batches])
        B, T = tokens.shape[1:]
        V, D = m0.vocab_size, m0.d_model
        run = torch.arange(G, device=tokens.device)[:, None, None]
        x = torch.nn.functional.embedding(tokens + run * V, torch.stack([m.embed.weight for m in models])
                                          .reshape(G * V, D)).reshape(G, B * T, D)
        for i, blk in enumerate(m0.blocks):
            blocks = [m.blocks[i] for m in models]
            mix = blk.mixer
            h = _norm(x, [b.norm1 for b in blocks])
            if mix.conv is not None:
                h = _conv(h, [b.mixer.conv.conv for b in blocks], B, T)
            gates = None if mix.gate is None else torch.sigmoid(_linear(h, [b.mixer.gate for b in blocks]))
            inp = mix.split(_linear(h, [b.mixer.qkv for b in blocks]).reshape(G * B, T, -1),
                            None if gates is None else gates.reshape(G * B, T, -1))
            y = mix.memory.causal(inp.keys, inp.values, inp.queries, inp.betas, **inp.gates)  # (G·B·H, T, D/H)
            y = y.reshape(G * B, mix.n_heads, T, -1).transpose(1, 2).reshape(G, B * T, D)
            x = x + _linear(y, [b.mixer.out for b in blocks])
            if blk.mlp is not None:
                h = _norm(x, [b.norm2 for b in blocks])
                h = torch.nn.functional.gelu(_linear(h, [b.mlp[0] for b in blocks]))
                x = x + _linear(h, [b.mlp[2] for b in blocks])
        mask = targets != IGNORE_INDEX
        x = x.reshape(G, B, T, D)
        return torch.stack([torch.nn.functional.cross_entropy(m.head(m.norm(x[g][mask[g]])), targets[g][mask[g]])
                            for g, m in enumerate(models)])

    @torch.no_grad()
    def _reads(self, model: CausalLM, ev, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss per query (n,), correct (n,) bool, mask (N, T)) over the eval set, in chunks of sequences."""
        model.eval()
        mask = ev.targets != IGNORE_INDEX
        losses, right = [], []
        for s in range(0, ev.tokens.shape[0], chunk):
            tok, tgt, m = ev.tokens[s:s + chunk], ev.targets[s:s + chunk], mask[s:s + chunk]
            logits = query_logits(model, tok, m)  # (n_c, vocab)
            losses.append(torch.nn.functional.cross_entropy(logits.float(), tgt[m], reduction="none"))
            right.append(logits.argmax(-1) == tgt[m])
        model.train()
        return torch.cat(losses), torch.cat(right), mask

    def evaluate(self, model: CausalLM, ev, cfg: RunConfig) -> Evaluation:
        T = ev.tokens.shape[1]
        chunk = max(1, min(cfg.train.batch_size, _EVAL_CHUNK_TOKENS // T))
        loss, right, mask = self._reads(model, ev, chunk)
        diags = []
        gaps, pos = ev.gaps[mask], ev.positions[mask]  # (n,) in mask.nonzero() order, as the reads
        gap_bin = torch.floor(torch.log2(gaps.clamp_min(2).float())).long()  # 1: [2,4), 2: [4,8), ...
        for b in gap_bin.unique().tolist():
            sel = gap_bin == b
            diags.append((2 ** b, "acc_by_gap", right[sel].float().mean().item()))
        width = max(1, math.ceil(T / 8))
        pos_bin = pos // width
        for b in pos_bin.unique().tolist():
            diags.append((b * width, "acc_by_position", right[pos_bin == b].float().mean().item()))
        n = max(right.numel(), 1)
        return Evaluation(loss=loss.sum().item() / n, acc=right.sum().item() / n, diagnostics=diags)

    def solved(self, ev: Evaluation, tc) -> bool:
        return ev.acc >= tc.stop_acc

    def final(self, model: CausalLM, task: Any, cfg: RunConfig, generator: torch.Generator) -> list[tuple]:
        """Accuracy at doubling evaluation lengths (extrapolation), and each layer's memory diagnostics."""
        rows: list[tuple] = []
        device = next(model.parameters()).device
        length = task.seq_len * 2
        while cfg.train.diagnostics and length <= task.eval_seq_len and length > task.seq_len:
            ev = to_device(task.eval_set(generator, seq_len=length), device)
            rows.append((length, "acc_by_length", self.evaluate(model, ev, cfg).acc))
            length *= 2
        if cfg.train.diagnostics:
            rows += layer_diagnostics(model, to_device(task.eval_set(generator), device), cfg.train.diag_positions)
        return rows

    def row(self, model: CausalLM, cfg: RunConfig, task: Any) -> dict[str, Any]:
        try:
            state = model.state_size(task.seq_len)
        except NotImplementedError:
            state = None
        d_dot = model.memories[0].d_dot(model.d_head)
        return {"num_keys": task.num_kv_pairs, "seq_len": task.seq_len, "d_key": model.d_head,
                "d_dot": d_dot, "state_size": state, "family": "lm", "d_model": cfg.model.d_model,
                "lr": cfg.train.lr, "eval_seq_len": task.eval_seq_len}

    def tracker(self, cfg: RunConfig):
        return None  # the per-layer diagnostics are made once, after training (``final``)


@torch.no_grad()
def layer_diagnostics(model: CausalLM, ev, max_positions: int, max_sequences: int = 4) -> list[tuple]:
    """Per layer and head: the memory's trace on the first ``max_sequences`` evaluation sequences, as the
    retrieval family's diagnostics rows (diagnostics.trace_rows) named ``L<l>H<h>.<metric>``. A write's "key" is
    its token, so a token seen before counts as a rewrite."""
    from ..diagnostics import safe_trace, trace_rows

    tokens = ev.tokens[:max_sequences]  # (n, T)
    rows: list[tuple] = []
    H = model.n_heads
    was = model.training
    model.eval()
    try:
        for layer, (mem, x) in enumerate(zip(model.memories, model.mixer_inputs(tokens), strict=True)):
            trace = safe_trace(mem, x.keys, x.values, x.betas, x.queries[:, -1:], x.gates)
            if trace is None:
                continue
            trace = {"v": x.values, **trace}
            for h in range(H):
                part = {k: v[h::H] for k, v in trace.items() if isinstance(v, torch.Tensor) and v.dim() >= 2
                        and v.shape[0] == tokens.shape[0] * H}
                mask = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
                rows += [(p, f"L{layer}H{h}.{name}", val)
                         for p, name, val in trace_rows(part, tokens, mask, max_positions=max_positions)]
    finally:
        model.train(was)
    return rows
