"""A plugin as a third party would write it, for tests that fake its entry points without installing anything.

``tests/test_plugins.py`` registers these with
``Registry.add_entry_point(EntryPoint(name, "tests.fake_plugin:...", group))``, exactly what
``importlib.metadata`` would hand the registry for an installed distribution:

* ``Fake``: an update rule with a decay gate, W_t = α_t W_{t-1} + β_t v_t ⊗ φ_t (Peng et al.'s gated rule with
  its two gates untied), group ``retrieval_bench.update_rules``. No fast form: the reference loop trains it.
* ``FakeMap``: a feature map φ(x) = [softplus(x); softplus(-x)], F = 2K, group
  ``retrieval_bench.feature_maps``.
* ``FakeMemory``: a registered memory, softmax attention with a learned inverse temperature, group
  ``retrieval_bench.memories``.
* ``FakeTask``: the capacity task under another name, group ``retrieval_bench.tasks``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import retrieval_bench as rb
from retrieval_bench.tasks import Task


class Fake(rb.UpdateRule):
    """W_t = α_t W_{t-1} + β_t v_t ⊗ φ_t, read W_L φ(q)."""

    name = "fake"
    gates = ("beta", "alpha")
    default_norm = "sum"
    supports_attn = False

    def step(self, state, k, v, g, t, attn):
        W = state["W"]
        v_bar = (W * k[:, None, :]).sum(-1)  # (B, V): the read at k_t before the write
        beta, alpha = g["beta"][:, None], g["alpha"][:, None]
        W = alpha[..., None] * W + (beta * v)[:, :, None] * k[:, None, :]
        return {"W": W}, {"v_bar": v_bar, "v_new": beta * v}


class FakeMap(rb.FeatureMap):
    """φ(x) = [softplus(x); softplus(-x)]: positive, F = 2K."""

    def dim(self, d_key: int) -> int:
        return 2 * d_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.softplus(x), F.softplus(-x)], dim=-1)


class FakeMemory(rb.Memory):
    """y = Σ_t softmax_t(τ k_t·q) v_t with a learned τ (a parameter, so the contract checks its gradient)."""

    projection_init = "xavier"

    def __init__(self):
        super().__init__()
        self.tau = nn.Parameter(torch.tensor(0.5))

    def state_size(self, d_key: int, d_value: int, seq_len: int) -> int:
        return seq_len * (d_key + d_value)

    def forward(self, keys, values, betas=None, queries=None, **gates):
        return torch.softmax(self.tau * queries @ keys.transpose(1, 2), dim=-1) @ values  # (B, Q, V)

    def reference(self, keys, values, betas=None, queries=None, **gates):
        """The same read, one sequence and one query at a time."""
        rows = []
        for b in range(queries.shape[0]):
            for i in range(queries.shape[1]):
                w = torch.exp(self.tau * (keys[b] * queries[b, i]).sum(-1))  # (L,)
                rows.append((w[:, None] * values[b]).sum(0) / w.sum())
        return torch.stack(rows).reshape(queries.shape[0], queries.shape[1], -1)

    @torch.no_grad()
    def trace(self, keys, values, betas=None, queries=None, **gates):
        return {"y": self.forward(keys, values, betas, queries), "v": values}


class FakeTask(Task):
    """Keys and values without replacement, like ``capacity``."""

    name = "fake-task"

    def sequences(self, batch, length, g):
        keys = torch.rand(batch, self.num_keys, generator=g).argsort(dim=1)[:, :length]
        values = torch.rand(batch, self.num_values, generator=g).argsort(dim=1)[:, :length]
        return keys, values
