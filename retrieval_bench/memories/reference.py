"""Naive per-step loops: the executable spec that every fast form is tested against.

One loop serves every update rule: it applies the rule's ``step`` to each write in order, then reads the
query once with ``read``. ``trace`` is the same loop under ``no_grad`` that also records per-step figures.
"""

from __future__ import annotations

import torch

from .rules import UpdateRule


def reference_loop(rule: UpdateRule, k, v, q, gates, attn: bool, record: bool = False):
    """Run ``rule`` step by step. k (B, L, F), v (B, L, V), q (B, Q, F), gates {name: (B, L), or (B, L, F)
    for a gate of width F (``UpdateRule.gate_widths``); step t gets g[:, t], (B,) or (B, F)}.

    Returns ``(y, records)``: y (B, Q, V) and, when ``record``, a dict of per-step tensors stacked over L:
    v_bar, v_new (B, L, V), state_norm (B, L) = ‖W_t‖_F, and with the attention normaliser normaliser
    (B, L) = z_t·φ(k_t) and normaliser_l1 (B, L) = ‖z_t‖_1.
    """
    B, L, Fdim = k.shape
    state = rule.init_state(B, v.shape[-1], Fdim, k, attn)
    recs: dict[str, list[torch.Tensor]] = {}
    for t in range(L):
        g_t = {name: g[:, t] for name, g in gates.items()}
        state, rec = rule.step(state, k[:, t], v[:, t], g_t, t, attn)
        if record:
            rec = dict(rec)
            rec["state_norm"] = torch.linalg.vector_norm(state["W"], dim=(1, 2))
            if "z" in state:
                rec["normaliser"] = (state["z"] * k[:, t]).sum(-1)
                rec["normaliser_l1"] = state["z"].abs().sum(-1)
            for name, val in rec.items():
                recs.setdefault(name, []).append(val)
    y = rule.read(state, q, attn)
    return y, {name: torch.stack(vals, dim=1) for name, vals in recs.items()}
