"""Fast Weight Memory's state (Schlag et al. 2021; PAPER §2.4) with a memory-light backward, in few ops per step.

FWM clips the norm of what it writes, so its loop admits no parallel form: the forward is the loop itself.
``fwm_state`` gives the final state W after L steps and, in its backward, recomputes states from checkpoints
instead of storing all L of them: O(√L) states alive at once with one level of checkpoints, O(L^⅓) with two
(used where one level would exceed ``FWM_STATE_BUDGET`` bytes), all in one bank of ``fwm_peak_states`` states
allocated by the forward (``_Bank``). It computes the same numbers as the per-step loop of ``reference.py`` (up
to float rounding); the tests compare them in outputs and gradients.

Ops per step. The loop is sequential, so its time is L times the cost of one step's ops; on a GPU, at these
sizes, that cost is each op's launch (~5-10 µs), not its work. So a step does the least it can and everything
else happens outside the loop: β·a for every step in one op before it; out= into buffers whose per-step views
are made once (a view is a dispatch too); and what does not feed the next step (the gradients wrt v and β, and
W_{t-1}'s share of a's) in a few batched ops per segment. A step is 5 ops forward (``_step``) and 7 backward
(``_backprop``), plus the 5 of its recompute, where the per-step loop this replaced dispatched 22 and 81 (aten
ops, views included; tests/test_runtime.py bounds the count). On CUDA the whole forward and the whole backward
each run as one CUDA graph, captured once per shape (``runtime.StaticGraph``), which removes the launches; and
there, where all L states fit in ``FWM_KEEP_ALL_BUDGET``, they are kept instead of recomputed (memory-light
stays the CPU's rule; with graphs the device holds about three copies of them: the graph's, the call's, and the
backward graph's input).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

from ..runtime import StaticGraph

log = logging.getLogger(__name__)

# FWM keeps its checkpoints in two levels where one level would hold more than this many bytes of states.
FWM_STATE_BUDGET = 128 * 2**20
#: Per device type: bytes of states under which the backward keeps all L states instead of recomputing them.
FWM_KEEP_ALL_BUDGET: dict[str, int] = {"cuda": 2**30}
#: Whether the training form runs as CUDA graphs on a GPU (RETRIEVAL_BENCH_FWM_GRAPHS=0 turns it off).
FWM_CUDA_GRAPHS = os.environ.get("RETRIEVAL_BENCH_FWM_GRAPHS", "1") != "0"
_GRAPHS_KEPT = 2  # shapes whose graphs stay captured (each holds its buffers on the device)


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


def _starts(first: int, sizes: list[int] | tuple[int, ...]) -> list[int]:
    return [first + sum(sizes[:i]) for i in range(len(sizes))]


def _plan(a: torch.Tensor, v: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """(levels, segment sizes): levels 0 keeps every state (one segment), 1 and 2 as in ``fwm_segments``."""
    B, L, F = a.shape
    state = B * v.shape[-1] * F * a.element_size()
    if L * state <= FWM_KEEP_ALL_BUDGET.get(a.device.type, 0):
        return 0, (L,)
    levels = 2 if state * fwm_peak_states(L) > FWM_STATE_BUDGET else 1
    return levels, tuple(fwm_segments(L, levels))


class _Steps:
    """Per-step views of FWM's inputs, made once per pass: a (B, L, F), v (B, L, V), beta (B, L) give rows
    a[t], βa[t] (B, 1, F), v[t] (B, 1, V), and for the backward -βa[t]; plus scratch for in-place steps."""

    def __init__(self, a: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, backward: bool = False):
        self.B, self.L, self.F = a.shape
        self.V = v.shape[-1]
        self.beta = beta
        self.like = a
        ba = a * beta[..., None]
        self.a = a.unsqueeze(2).unbind(1)
        self.ba = ba.unsqueeze(2).unbind(1)
        self.v = v.unsqueeze(2).unbind(1)
        self.v0 = v[:, 0, :, None]  # (B, V, 1)
        self.nba = torch.neg(ba).unsqueeze(2).unbind(1) if backward else None
        self._scratch = None

    def new(self, *shape: int) -> torch.Tensor:
        return self.like.new_empty(shape)

    def scratch(self):
        """d (B, 1, V), its column, n and m (B, 1, 1), for steps whose record is not kept."""
        if self._scratch is None:
            d = self.new(self.B, 1, self.V)
            self._scratch = (d, d.transpose(1, 2), self.new(self.B, 1, 1), self.new(self.B, 1, 1))
        return self._scratch


class _Bank:
    """States (slots, B, V, F) with each slot's views made once: W, Wᵀ, and W flattened to a row (B, 1, V·F).

    One bank holds the checkpoints and the states recomputed from them: segment i of a pass (entering state in
    slot i) is recomputed into slots i+1 .. i+s_i, whose checkpoints the backward, going last to first, no longer
    needs; ``fwm_segments`` keeps i + 1 + s_i within ``fwm_peak_states`` slots. So the backward allocates no
    state, and slot i followed by the segment's states are the W_{t-1} of its steps, contiguous.
    """

    def __init__(self, x: _Steps, slots: int, tensor: torch.Tensor | None = None):
        self.tensor = x.new(slots, x.B, x.V, x.F) if tensor is None else tensor
        self.W = self.tensor.unbind(0)
        self.Wt = self.tensor.transpose(2, 3).unbind(0)
        self.flat = self.tensor.view(slots, x.B, 1, x.V * x.F).unbind(0)


def _step(x: _Steps, t: int, W, Wt, out, d, dc, n, m) -> None:
    """Step t >= 1 in 5 ops: out = W̃ / max(‖W̃‖, 1), W̃ = W + β (v - W a) ⊗ a (out may be W itself).

    W, out (B, V, F); Wt = Wᵀ (a view); writes d = v - W a (B, 1, V) (dc its (B, V, 1) view), n = ‖W̃‖ and
    m = max(n, 1) (B, 1, 1). β(v - v̄) is the paper's β v + (1 - β) v̄ - v̄.
    """
    torch.baddbmm(x.v[t], x.a[t], Wt, alpha=-1, out=d)
    if out is W:
        W.addcmul_(dc, x.ba[t])
    else:
        torch.addcmul(W, dc, x.ba[t], out=out)
    torch.linalg.vector_norm(out, dim=(1, 2), keepdim=True, out=n)
    torch.clamp_min(n, 1.0, out=m)
    out.div_(m)


def _run(x: _Steps, W, Wt, first: int, stop: int) -> None:
    """Steps first..stop-1 in place on W (the state entering ``first``; its content is ignored at step 0)."""
    d, dc, n, m = x.scratch()
    for t in range(first, stop):
        if t == 0:  # W_1 = β_1 v_1 ⊗ a_1, no clipping
            torch.mul(x.v0, x.ba[0], out=W)
        else:
            _step(x, t, W, Wt, W, d, dc, n, m)


def _checkpoint(x: _Steps, bank: _Bank, k: int, first: int, sizes) -> None:
    """From the state in slot k (entering step ``first``), the states entering segments 1, 2, ... of ``sizes``
    into slots k+1, k+2, ... (each advanced in place from a copy of the one before)."""
    for j, start in enumerate(_starts(first, sizes)[:-1]):
        bank.W[k + j + 1].copy_(bank.W[k + j])
        _run(x, bank.W[k + j + 1], bank.Wt[k + j + 1], start, start + sizes[j])


class _Work:
    """Per-step buffers of a pass over segments of up to ``size`` steps, with their per-step views made once (a
    view is a dispatch too): d = v - W_{t-1} a (B, 1, V) and its column, n = ‖W̃‖, m = max(n, 1) and
    c = [n >= 1] / m (B, 1, 1); for the backward, g_δ (B, 1, V) and its column, and dᵀ G̃ (B, 1, F).
    D, M, C may be given (a record kept by the forward)."""

    def __init__(self, x: _Steps, size: int, backward: bool = False, D=None, M=None, C=None):
        B, V, F = x.B, x.V, x.F
        self.D = x.new(size, B, 1, V) if D is None else D
        self.N = x.like.new_zeros(size, B, 1, 1)
        self.M = x.like.new_ones(size, B, 1, 1) if M is None else M
        self.C = x.new(size, B, 1, 1) if C is None else C
        self.d, self.dc = self.D.unbind(0), self.D.transpose(2, 3).unbind(0)
        self.n, self.m, self.c = self.N.unbind(0), self.M.unbind(0), self.C.unbind(0)
        if backward:
            self.GD, self.GA, self.dot = x.new(size, B, 1, V), x.new(size, B, 1, F), x.new(B, 1, 1)
            self.gd, self.gdc, self.ga = self.GD.unbind(0), self.GD.transpose(2, 3).unbind(0), self.GA.unbind(0)
            self.D3, self.GD3, self.GA3 = self.D.view(size, B, V), self.GD.view(size, B, V), self.GA.view(size, B, F)

    def coefficients(self) -> None:
        # the clamp passes the norm's gradient where ‖W̃‖ >= 1 (torch's rule for clamp_min at the boundary)
        torch.div(self.N >= 1.0, self.M, out=self.C)


def _recompute(x: _Steps, bank: _Bank, k: int, first: int, size: int, w: _Work) -> None:
    """Steps first..first+size-1 from the state in slot k, into slots k+1..k+size, keeping what their backward
    needs in w's first ``size`` slots: d, m and c."""
    for j in range(size):
        t, prev, cur = first + j, k + j, k + j + 1
        if t == 0:  # unclipped: m = 1 and no projection in the backward; d = v (W_0 = 0)
            torch.mul(x.v0, x.ba[0], out=bank.W[cur])
            w.d[0].copy_(x.v[0])
            w.n[0].zero_()
            w.m[0].fill_(1.0)
        else:
            _step(x, t, bank.W[prev], bank.Wt[prev], bank.W[cur], w.d[j], w.dc[j], w.n[j], w.m[j])
    w.coefficients()


class _Grads:
    """The gradients wrt a (B, L, F), v (B, L, V), beta (B, L) (None where not needed), written a segment at a
    time through (L, B, ·) views: ∂ℓ/∂a_t = β (dᵀ G̃ - g_δᵀ W_{t-1}), ∂ℓ/∂v_t = β g_δ, ∂ℓ/∂β_t = g_δ·d."""

    def __init__(self, x: _Steps, needs):
        shapes = ((x.B, x.L, x.F), (x.B, x.L, x.V), (x.B, x.L))
        self.grads = [x.new(*shape) if need else None for shape, need in zip(shapes, needs, strict=True)]
        self.T = [None if g is None else g.transpose(0, 1) for g in self.grads]
        self.beta = x.beta.t()[:, :, None]  # (L, B, 1)

    def write(self, first: int, size: int, w: _Work) -> None:
        span = slice(first, first + size)
        beta = self.beta[span]
        ga, gv, gbeta = self.T
        if ga is not None:
            torch.mul(w.GA3[:size], beta, out=ga[span])
        if gv is not None:
            torch.mul(w.GD3[:size], beta, out=gv[span])
        if gbeta is not None:
            torch.sum(w.GD3[:size] * w.D3[:size], -1, out=gbeta[span])


def _backprop(x: _Steps, w: _Work, bank: _Bank, k: int, first: int, size: int, G, out: _Grads) -> None:
    """Backprop G = ∂ℓ/∂W_{first+size} through the segment that ``_recompute`` put in slots k+1..k+size (entering
    state in slot k), in place: G ends as ∂ℓ/∂W_first. Writes the segment's gradients into ``out``.

    Per step, 7 ops: with W̃ = W_{t-1} + δ ⊗ a, δ = β d, d = v - W_{t-1} a and W_t = W̃ / m,
    G̃ = (G - [n >= 1] (G·W_t) W_t) / m = ∂ℓ/∂W̃; g_δ = G̃ a; dᵀ G̃; and ∂ℓ/∂W_{t-1} = G̃ - β g_δ ⊗ a.
    W_{t-1}'s share of ∂ℓ/∂a_t, -β W_{t-1}ᵀ g_δ, needs nothing of the next step: one op for the segment.
    """
    B, V, F = x.B, x.V, x.F
    Gt, Gf = G.transpose(1, 2), G.view(B, V * F, 1)
    for j in range(size - 1, -1, -1):
        t, cur = first + j, k + j + 1
        if t > 0:
            torch.bmm(bank.flat[cur], Gf, out=w.dot)  # G·W_t
            w.dot.mul_(w.c[j])
            G.div_(w.m[j])
            G.addcmul_(bank.W[cur], w.dot, value=-1)  # G̃
        torch.bmm(x.a[t], Gt, out=w.gd[j])  # g_δ = G̃ a (B, 1, V)
        torch.bmm(w.d[j], G, out=w.ga[j])  # dᵀ G̃ (B, 1, F)
        if t > 0:
            G.addcmul_(w.gdc[j], x.nba[t])
    # W_{t-1} of the segment's steps: slots k..k+size-1 (slot 0 holds W_0 = 0)
    w.GA[:size].view(-1, 1, F).baddbmm_(w.GD[:size].view(-1, 1, V), bank.tensor[k:k + size].view(-1, V, F),
                                        alpha=-1)
    out.write(first, size, w)


def _segments_backward(x: _Steps, w: _Work, bank: _Bank, k: int, first: int, sizes, G, out: _Grads) -> None:
    """Backprop through segments ``sizes`` from step ``first``, whose entering states are in slots k, k+1, ...:
    each, last to first, recomputed into the slots after its own, then backpropagated."""
    for i, (start, size) in reversed(list(enumerate(zip(_starts(first, sizes), sizes, strict=True)))):
        _recompute(x, bank, k + i, start, size, w)
        _backprop(x, w, bank, k + i, start, size, G, out)


def _forward(a, v, beta, plan) -> list[torch.Tensor]:
    """[W_L, *saved]: saved is what ``_backward`` needs: with levels 0 every state (a bank of L + 1, W_0 = 0
    first) and the record d, m, c; else a bank of ``fwm_peak_states`` slots with the checkpoints entering the
    segments in its first slots."""
    levels, sizes = plan
    x = _Steps(a, v, beta)
    if levels == 0:
        bank, w = _Bank(x, x.L + 1), _Work(x, x.L)
        bank.W[0].zero_()
        _recompute(x, bank, 0, 0, x.L, w)
        return [bank.W[-1].clone(), bank.tensor, w.D, w.M, w.C]  # W_L cloned: the record must not change
    bank = _Bank(x, fwm_peak_states(x.L, levels))
    bank.W[0].zero_()
    _checkpoint(x, bank, 0, 0, sizes)
    W = bank.W[len(sizes) - 1].clone()
    _run(x, W, W.transpose(1, 2), x.L - sizes[-1], x.L)
    return [W, bank.tensor]


def _backward(a, v, beta, plan, saved: list, G, needs=(True, True, True)) -> list[torch.Tensor | None]:
    """(∂ℓ/∂a, ∂ℓ/∂v, ∂ℓ/∂beta) from G = ∂ℓ/∂W_L (None where not needed). The bank in ``saved`` is overwritten."""
    levels, sizes = plan
    x = _Steps(a, v, beta, backward=True)
    out = _Grads(x, needs)
    G = G.clone(memory_format=torch.contiguous_format)
    if levels == 0:
        tensor, D, M, C = saved
        _backprop(x, _Work(x, x.L, True, D, M, C), _Bank(x, x.L + 1, tensor), 0, 0, x.L, G, out)
        return out.grads
    bank = _Bank(x, saved[0].shape[0], saved[0])
    if levels == 1:
        _segments_backward(x, _Work(x, sizes[0], backward=True), bank, 0, 0, sizes, G, out)
        return out.grads
    # two levels: segment i's own segments, checkpointed from slot i into the slots after it
    w = _Work(x, fwm_segments(sizes[0])[0], backward=True)
    for i, (start, size) in reversed(list(enumerate(zip(_starts(0, sizes), sizes, strict=True)))):
        inner = fwm_segments(size)
        _checkpoint(x, bank, i, start, inner)
        _segments_backward(x, w, bank, i, start, inner, G, out)
    return out.grads


# ---------------------------------------------------------------------------------------------------- graphs
_CAPTURE = None  # how graphs are captured: None is runtime.cuda_capture (the tests put rerun_capture here)
_GRAPHS: OrderedDict[tuple, _FWMGraphs] = OrderedDict()
_GRAPH_FAILED: set[tuple] = set()


def _use_graphs(a: torch.Tensor) -> bool:
    return FWM_CUDA_GRAPHS and a.is_cuda and not torch.cuda.is_current_stream_capturing()


class _FWMGraphs:
    """``_forward`` and ``_backward`` for one shape and plan as two captured graphs; calls return fresh tensors."""

    def __init__(self, a, v, beta, plan):
        self.fwd = StaticGraph(lambda a, v, b: _forward(a, v, b, plan), (a, v, beta), _CAPTURE)
        example = (a, v, beta, torch.zeros_like(self.fwd.outputs[0]), *self.fwd.outputs[1:])
        self.bwd = StaticGraph(lambda a, v, b, G, *saved: _backward(a, v, b, plan, list(saved), G), example,
                               _CAPTURE)

    def forward(self, a, v, beta) -> list[torch.Tensor]:
        return self.fwd(a, v, beta)

    def backward(self, a, v, beta, saved: list, G) -> list[torch.Tensor]:
        grads = self.bwd(a, v, beta, G, *saved)
        saved.clear()
        return grads


def _graphs_for(a, v, beta, plan) -> _FWMGraphs | None:
    """The captured graphs for this call's shape (captured now if new), or None: not on CUDA, graphs off, or
    their capture failed once for this shape (then the eager form, which computes the same, runs)."""
    if not _use_graphs(a):
        return None
    key = (tuple(a.shape), v.shape[-1], a.dtype, a.device, plan)
    if key in _GRAPH_FAILED:
        return None
    graphs = _GRAPHS.get(key)
    if graphs is None:
        try:
            graphs = _FWMGraphs(a, v, beta, plan)
        except Exception as e:  # noqa: BLE001  (any capture failure: the eager form is always there)
            log.warning("FWM: capturing a CUDA graph for shape %s failed (%s: %s); running it eagerly",
                        key[:2], type(e).__name__, e)
            _GRAPH_FAILED.add(key)
            return None
        _GRAPHS[key] = graphs
        while len(_GRAPHS) > _GRAPHS_KEPT:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    return graphs


def clear_fwm_graphs() -> None:
    """Release every captured FWM graph and its device memory (they are captured again when next needed)."""
    _GRAPHS.clear()
    _GRAPH_FAILED.clear()


class _FWMState(torch.autograd.Function):
    """W_L of Fast Weight Memory (PAPER §1.8), with a backward that recomputes states from checkpoints."""

    @staticmethod
    def forward(ctx, a, v, beta):
        plan = _plan(a, v)
        graphs = _graphs_for(a, v, beta, plan)
        out = graphs.forward(a, v, beta) if graphs is not None else _forward(a, v, beta, plan)
        ctx.save_for_backward(a, v, beta)
        ctx.plan, ctx.graphs = plan, graphs
        ctx.saved = out[1:]  # a plain attribute, dropped by the backward (which overwrites the bank)
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        a, v, beta = ctx.saved_tensors
        saved = ctx.saved
        if saved is None:  # a second backward through the graph (retain_graph): checkpoint again
            saved = (ctx.graphs.forward(a, v, beta) if ctx.graphs is not None
                     else _forward(a, v, beta, ctx.plan))[1:]
        ctx.saved = None  # used up: a second backward must checkpoint again
        if ctx.graphs is not None:
            grads = ctx.graphs.backward(a, v, beta, saved, G)
        else:
            # a gradient nobody asked for is not computed (the model's one-hot values need none: B·L·V floats)
            grads = _backward(a, v, beta, ctx.plan, saved, G, ctx.needs_input_grad)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))


def fwm_state(a: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Final fast weight W_L of FWM (PAPER §1.8) after L writes, memory-light in training.

    W_1 = β_1 v_1 ⊗ a_1; then W̃ = W + (β v + (1-β) v̄ - v̄) ⊗ a with v̄ = W a, and W = W̃ / max(1, ‖W̃‖_F).
    The clipping admits no parallel form and is not cheaply invertible, so the backward recomputes each
    segment's states from a checkpoint (``fwm_segments``): O(√L) states alive instead of the loop's L, or
    O(L^⅓) with a second level of checkpoints where the states are large (``FWM_STATE_BUDGET``); on a GPU,
    all L where they fit in ``FWM_KEEP_ALL_BUDGET``.

    Args:
        a: keys (B, L, F). v: values (B, L, V). beta: (B, L).

    Returns:
        W_L (B, V, F).
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (a, v, beta)):
        return _FWMState.apply(a, v, beta)
    x = _Steps(a, v, beta)  # no backward to come: no checkpoints
    W = x.new(x.B, x.V, x.F)
    _run(x, W, W.transpose(1, 2), 0, x.L)
    return W
