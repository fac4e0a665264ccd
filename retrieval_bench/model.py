"""The paper's single retrieval layer around any memory (PAPER §2.2), and its loss.

x_t = [onehot(v_t); e(k_t)] ∈ R^{V+E} with a trainable key embedding e of width E = ⌊2.2·S⌋ ~ N(0, 1);
k_t = W_k x_t ∈ R^K; each gate (β, or any the rule declares) is σ(W_g x_t), one scalar per step, or F per step for
a gate of one value per feature of the state (``Memory.gate_dim``, e.g. RWKV-7's decay); the stored value
is onehot(v_t) itself (d_v = V, no value projection); the query is q = W_q e(q_key); the read ŷ ∈ R^V.

Since x_t is a one-hot next to an embedding row, W_k x_t is computed as a gather of two tables, W_k's one-hot
columns and E·W_eᵀ, instead of a GEMM over V + E inputs: the same numbers, a fraction of the work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .memories import Memory, memory
from .memories.causal import gate_width
from .memories.chunked import mark_one_hot


class RetrievalModel(nn.Module):
    """Args:
    num_keys: S, the key vocabulary. num_values: V (default S). memory: a spec string or a Memory.
    d_key: K. embed_factor: E = ⌊embed_factor·S⌋ (the official code's 2.2·S).
    """

    def __init__(self, num_keys: int, memory_spec: str | Memory, d_key: int = 64, num_values: int | None = None,
                 embed_factor: float = 2.2, **memory_kwargs):
        super().__init__()
        self.num_keys = num_keys
        self.num_values = num_keys if num_values is None else num_values
        if num_keys < 1 or self.num_values < 1:
            raise ValueError(f"num_keys and num_values must be >= 1, got {num_keys} and {self.num_values}")
        self.d_key = d_key
        self.memory = memory(memory_spec, d_key=d_key, **memory_kwargs) if isinstance(memory_spec, str) \
            else memory_spec
        E = int(embed_factor * num_keys)
        if E < 1:
            raise ValueError(f"embed_factor·num_keys must be >= 1, got {embed_factor}·{num_keys}")
        V = self.num_values
        self.embedding = nn.Parameter(torch.randn(num_keys, E))  # N(0, 1), PAPER §2.2
        self.W_k = nn.Linear(V + E, d_key)
        self.W_q = nn.Linear(E, d_key)
        self.gate_names = tuple(self.memory.gates)
        #: each gate's width: 1 (a scalar per step, (B, L)) or F (one value per feature, (B, L, F))
        self.gate_widths = {g: gate_width(self.memory, g, d_key) for g in self.gate_names}
        self.W_g = nn.ModuleDict({g: nn.Linear(V + E, self.gate_widths[g]) for g in self.gate_names})
        unknown = sorted(set(self.memory.gate_bias) - set(self.gate_names))
        if unknown:
            raise ValueError(f"gate_bias names {unknown}, which are not gates of the memory "
                             f"(its gates: {list(self.gate_names)})")
        for g, b in self.memory.gate_bias.items():  # after the default init, so no random draw moves
            nn.init.constant_(self.W_g[g].bias, float(b))
        if self.memory.projection_init == "xavier":
            nn.init.xavier_uniform_(self.W_k.weight)
            nn.init.xavier_uniform_(self.W_q.weight)
        else:  # the official code's U(±1/√d_out) on the key and query weights; biases keep PyTorch's default
            bound = 1.0 / math.sqrt(d_key)
            nn.init.uniform_(self.W_k.weight, -bound, bound)
            nn.init.uniform_(self.W_q.weight, -bound, bound)

    def _project(self, lins: list[nn.Linear], keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Every lin([onehot(values); e(keys)]) for (B, L) ids, stacked -> (B, L, Σ out), as two gathers."""
        V = self.num_values
        weight = torch.cat([lin.weight for lin in lins]) if len(lins) > 1 else lins[0].weight  # (out, V+E)
        bias = torch.cat([lin.bias for lin in lins]) if len(lins) > 1 else lins[0].bias
        # One table for the key and every gate: a gate alone would be an (S, E) x (E, 1) mat-vec, slow on CPU.
        w_val = weight[:, :V].t().contiguous()  # (V, out): the columns a one-hot selects, as contiguous rows
        w_key = torch.addmm(bias, self.embedding, weight[:, V:].t())  # (S, out), the bias folded in
        B, L = keys.shape
        # index_select, not F.embedding: the same gather, but embedding's backward was 2-3x slower here
        out = w_val.index_select(0, values.reshape(-1)) + w_key.index_select(0, keys.reshape(-1))
        return out.reshape(B, L, -1)

    def inputs(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor):
        """The memory's inputs for (B, L) ids and (B, Q) query ids: k (B, L, K), v (B, L, V), betas (B, L)
        or None, q (B, Q, K), and the rule's other gates {name: (B, L), or (B, L, F) for a width-F gate}."""
        proj = self._project([self.W_k, *(self.W_g[g] for g in self.gate_names)], keys, values)  # (B, L, K+ΣG)
        B, Q = queries.shape
        if B * Q > self.num_keys:  # many queries (evaluation): project the S embedding rows once, then gather
            table = torch.addmm(self.W_q.bias, self.embedding, self.W_q.weight.t())  # (S, K)
            q = table.index_select(0, queries.reshape(-1)).reshape(B, Q, -1)
        else:
            q = self.W_q(self.embedding.index_select(0, queries.reshape(-1))).reshape(B, Q, -1)
        return self.split_inputs(proj, values, q)

    def split_inputs(self, proj: torch.Tensor, values: torch.Tensor, q: torch.Tensor):
        """The memory's inputs (as ``inputs`` returns them) from the projections ``proj`` (B, L, K+ΣG) of the
        written pairs, their value ids (B, L) and the projected queries ``q`` (B, Q, K): the key and each gate
        split off (gates through σ), and onehot(values). group.py calls it with G runs' projections stacked
        along B."""
        K = self.d_key
        k = proj[..., :K]
        gates, at = {}, K
        for g in self.gate_names:
            w = self.gate_widths[g]
            gates[g] = torch.sigmoid(proj[..., at] if w == 1 else proj[..., at: at + w])  # (B, L) or (B, L, F)
            at += w
        # onehot(values) written straight as floats (F.one_hot would first build it in int64), by a fill at
        # flat offsets (a scatter along the last dimension took longer than zeroing the whole tensor).
        V = self.num_values
        v = torch.zeros(*values.shape, V, dtype=k.dtype, device=k.device)
        offsets = torch.arange(values.numel(), device=values.device) * V + values.reshape(-1)
        v.view(-1).index_fill_(0, offsets, 1.0)
        mark_one_hot(v, values)  # lets the fast forms gather by id instead of reading all B·L·V entries
        return k, v, gates.pop("beta", None), q, gates

    def forward(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """keys, values (B, L) ids; queries (B, Q) key ids -> ŷ (B, Q, V)."""
        k, v, betas, q, gates = self.inputs(keys, values, queries)
        return self.memory(k, v, betas, q, **gates)


def retrieval_loss(y: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """½·Σ_i (ŷ_i - onehot(target)_i)², averaged over queries (PAPER §2.3). y (..., V), target (...)."""
    err = y - F.one_hot(target, y.shape[-1]).to(y.dtype)
    per_query = 0.5 * (err * err).sum(-1)
    if mask is None:
        return per_query.mean()
    return (per_query * mask).sum() / mask.sum().clamp_min(1)
