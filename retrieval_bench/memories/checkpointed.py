"""Fast Weight Memory's state (Schlag et al. 2021; PAPER §2.4) with a memory-light backward.

FWM clips the norm of what it writes, so its loop admits no parallel form: the forward is the loop itself.
``fwm_state`` gives the final state W after L steps and, in its backward, recomputes states from checkpoints
instead of storing all L of them: O(√L) states alive at once with one level of checkpoints, O(L^⅓) with two
(used where one level would exceed ``FWM_STATE_BUDGET`` bytes). It computes the same numbers as the per-step
loop of ``reference.py`` (up to float rounding); the tests compare them in outputs and gradients.
"""

from __future__ import annotations

import torch

# FWM keeps its checkpoints in two levels where one level would hold more than this many bytes of states.
FWM_STATE_BUDGET = 128 * 2**20


def fwm_peak_states(L: int, levels: int = 1) -> int:
    """States alive at once in FWM's backward over L steps with ``fwm_segments(L, levels)``."""
    P = 2
    while (P * (P - 1) // 2 if levels == 1 else (P + 1) * P * (P - 1) // 6) < L:
        P += 1
    return P


def fwm_segments(L: int, levels: int = 1) -> list[int]:
    """Segment lengths for FWM's checkpointed backward, longest first, summing to L.

    The backward walks segments last to first, holding the checkpoints of segments 0..i while it does
    segment i, plus that segment's working states. With one level those are the segment's recomputed states:
    lengths P-1, P-2, ..., 1 keep the total at P ≈ √(2L) at every moment (equal segments need 2√L). With two
    levels a segment is itself split the same way, holding about √(2s) states for s steps, so lengths
    b(b-1)/2 for b = P, P-1, ..., 2 keep the total at P ≈ (6L)^⅓, for one more forward pass of recompute.
    """
    P = fwm_peak_states(L, levels)
    sizes, left = [], L
    for b in range(P, 1, -1):
        take = min(b - 1 if levels == 1 else b * (b - 1) // 2, left)
        if take:
            sizes.append(take)
        left -= take
    return sizes


def _mv(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W (B, V, F) · x (B, F) -> (B, V) as a row-vector product (a bmm with a trailing 1 is far slower)."""
    return (x[:, None, :] @ W.transpose(1, 2))[:, 0]


def _vm(y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """yᵀ W: y (B, V), W (B, V, F) -> (B, F)."""
    return (y[:, None, :] @ W)[:, 0]


def _fwm_write(W, a, v, beta):
    """One FWM write after the first (FWMRule.step): W (B, V, F), a (B, F), v (B, V), beta (B, 1).

    Returns W_t, the norm ‖W̃‖ before clamping (B,), and v̄ = W_{t-1} a (B, V).
    """
    v_bar = _mv(W, a)
    v_new = beta * v + (1 - beta) * v_bar
    W = torch.addcmul(W, (v_new - v_bar)[:, :, None], a[:, None, :])  # W̃ = W + (v_new - v̄) ⊗ a, one pass
    norm = torch.linalg.vector_norm(W, dim=(1, 2))
    return W.div_(norm.clamp_min(1.0)[:, None, None]), norm, v_bar


def _fwm_step(W, t, a_s, v_s, beta_s):
    """Step t of FWM from W = W_t (None at t = 0) -> (W_{t+1}, ‖W̃‖ before clamping, v̄)."""
    if t == 0:  # W_1 = β_1 v_1 ⊗ φ_1, no clipping
        return (beta_s[0] * v_s[0])[:, :, None] * a_s[0][:, None, :], None, None
    return _fwm_write(W, a_s[t], v_s[t], beta_s[t])


def _fwm_loop(a, v, beta, starts=(), W=None, first=0, steps=None):
    """FWM's loop over steps first..first+steps-1 from W (the state entering ``first``; None before step 0).
    Returns the final state and the states entering the steps in ``starts``."""
    a_s, v_s, beta_s = a.unbind(1), v.unbind(1), beta[..., None].unbind(1)
    starts = set(starts)
    checkpoints = []
    for t in range(first, first + (a.shape[1] - first if steps is None else steps)):
        if t in starts:
            checkpoints.append(W)
        W = _fwm_step(W, t, a_s, v_s, beta_s)[0]
    return W, checkpoints


def _starts(first: int, sizes: list[int]) -> list[int]:
    return [first + sum(sizes[:i]) for i in range(len(sizes))]


class _FWMState(torch.autograd.Function):
    """W_L of Fast Weight Memory (PAPER §1.8), with a backward that recomputes states from checkpoints."""

    @staticmethod
    def forward(ctx, a, v, beta):
        B, L, F = a.shape
        state_bytes = B * v.shape[-1] * F * a.element_size()
        levels = 2 if state_bytes * fwm_peak_states(L) > FWM_STATE_BUDGET else 1
        sizes = fwm_segments(L, levels)
        starts = _starts(0, sizes)
        W, checkpoints = _fwm_loop(a, v, beta, starts)
        ctx.save_for_backward(a, v, beta)
        ctx.checkpoints = checkpoints  # a plain attribute: freed one by one during the backward
        ctx.starts, ctx.sizes, ctx.levels = starts, sizes, levels
        return W

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        a, v, beta = ctx.saved_tensors
        steps = (a.unbind(1), v.unbind(1), beta[..., None].unbind(1))
        # a gradient nobody asked for is not computed (the model's one-hot values need none: B·L·V floats)
        grads = tuple(torch.zeros_like(x) if need else None
                      for x, need in zip((a, v, beta), ctx.needs_input_grad, strict=True))
        G = G.clone()
        checkpoints = ctx.checkpoints
        if checkpoints is None:  # a second backward through the graph (retain_graph): checkpoint again
            checkpoints = _fwm_loop(a, v, beta, ctx.starts)[1]
        ctx.checkpoints = None  # the local list alone holds them now: each is freed once its segment is done
        for start, size in zip(reversed(ctx.starts), reversed(ctx.sizes), strict=True):
            W = checkpoints.pop()
            if ctx.levels == 2:
                G = _fwm_backprop_split(W, start, size, G, steps, grads)
            else:
                G = _fwm_backprop_segment(W, start, size, G, steps, grads)
        return grads


def _fwm_backprop_split(W, start, size, G, steps, grads):
    """Backprop through steps start..start+size-1 from the state W entering them, one checkpoint level down."""
    sizes = fwm_segments(size)
    starts = _starts(start, sizes)
    # recompute the sub-checkpoints (the last sub-segment's states are recomputed by its own pass)
    a_s, v_s, beta_s = steps
    checkpoints = [W]
    for t in range(start, starts[-1]):
        W = _fwm_step(W, t, a_s, v_s, beta_s)[0]
        if t + 1 in starts:
            checkpoints.append(W)
    for sub_start, sub_size in zip(reversed(starts), reversed(sizes), strict=True):
        G = _fwm_backprop_segment(checkpoints.pop(), sub_start, sub_size, G, steps, grads)
    return G


def _fwm_backprop_segment(W, start, size, G, steps, grads):
    """Backprop G = ∂ℓ/∂W_{start+size} through steps start..start+size-1, recomputing their states from W
    (the state entering them) with the forward's own ops, so bit-identical to the forward's. Accumulates
    into grads = (ga, gv, gbeta) and returns ∂ℓ/∂W_start."""
    a_s, v_s, beta_s = steps
    ga, gv, gbeta = grads
    states, norms, v_bars = [W], [], []
    for t in range(start, start + size):
        W, norm, v_bar = _fwm_step(W, t, a_s, v_s, beta_s)
        states.append(W)
        norms.append(norm)
        v_bars.append(v_bar)
    for i in range(size - 1, -1, -1):
        t = start + i
        W_t, W_prev = states[i + 1], states[i]
        states[i + 1] = None  # release as we go
        b_t, a_t, v_t = beta_s[t], a_s[t], v_s[t]
        if t == 0:  # W_1 = (β v) ⊗ a
            Ga = _mv(G, a_t)
            if gv is not None:
                gv[:, 0] = b_t * Ga
            if gbeta is not None:
                gbeta[:, 0] = (Ga * v_t).sum(-1)
            if ga is not None:
                ga[:, 0] = _vm(b_t * v_t, G)
            return None
        norm, v_bar = norms[i], v_bars[i]
        # Through W_t = W̃ / max(‖W̃‖, 1): the clamp passes the gradient where ‖W̃‖ >= 1 (torch's rule).
        lam = torch.where(norm >= 1.0, (G * W_t).sum((1, 2)), torch.zeros_like(norm))
        G = torch.addcmul(G, W_t, -lam[:, None, None]).div_(norm.clamp_min(1.0)[:, None, None])
        # Through W̃ = W_{t-1} + δ ⊗ a with δ = β v + (1 - β) v̄ - v̄ and v̄ = W_{t-1} a.
        delta = b_t * v_t + (1 - b_t) * v_bar - v_bar
        g_delta = _mv(G, a_t)
        g_vbar = -b_t * g_delta
        if gv is not None:
            gv[:, t] = b_t * g_delta
        if gbeta is not None:
            gbeta[:, t] = (g_delta * (v_t - v_bar)).sum(-1)
        if ga is not None:
            ga[:, t] = _vm(delta, G) + _vm(g_vbar, W_prev)
        G.addcmul_(g_vbar[:, :, None], a_t[:, None, :])
    return G


def fwm_state(a: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Final fast weight W_L of FWM (PAPER §1.8) after L writes, memory-light in training.

    W_1 = β_1 v_1 ⊗ a_1; then W̃ = W + (β v + (1-β) v̄ - v̄) ⊗ a with v̄ = W a, and W = W̃ / max(1, ‖W̃‖_F).
    The clipping admits no parallel form and is not cheaply invertible, so the backward recomputes each
    segment's states from a checkpoint (``fwm_segments``): O(√L) states alive instead of the loop's L, or
    O(L^⅓) with a second level of checkpoints where the states are large (``FWM_STATE_BUDGET``).

    Args:
        a: keys (B, L, F). v: values (B, L, V). beta: (B, L).

    Returns:
        W_L (B, V, F).
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (a, v, beta)):
        return _FWMState.apply(a, v, beta)
    return _fwm_loop(a, v, beta)[0]  # no backward to come: no checkpoints
