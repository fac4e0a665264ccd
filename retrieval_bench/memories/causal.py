"""All-positions causal forms of the memories (DESIGN §9): write (k_t, v_t), then read with q_t, at every t.

    keys (B, T, K)   values (B, T, V)   queries (B, T, K)   betas (B, T)   gates {name: (B, T)}   ->   (B, T, V)

A gate of one value per feature of the state (``Memory.gate_dim``) is (B, T, F). Position t is read after its
own write (the paper's order, PAPER §4 pitfall 12). Heads are folded into the batch by the caller. The spec is the
reference loop's own step and read functions with a read after every step (``causal_loop``): y_t = read(W_t, q_t).
The fast forms compute the same numbers:

* softmax: ``scaled_dot_product_attention(is_causal=True)`` with the memory's 1/√K scaling;
* the sum rule: chunked causal linear attention (``sum_causal``): within a chunk a masked (C×C) score matrix,
  across chunks the exclusive prefix sums of the chunks' states, all chunks at once (no sequential loop);
* the delta rule: the chunkwise WY / UT form (``delta_causal``, as ``chunked.delta_chunkwise`` with the reads
  batched after the loop and a matmul-only triangular inverse), the attention-normalised rule as the generalised
  delta rule of read key φ_t / c_t (PAPER §1.5), as the rule's training form does;
* FWM: its recurrence, a loop whose backward recomputes segments from checkpoints (O(√T) states alive);
* RWKV-7's generalised delta rule: its own chunked form (``generalised.gd_causal``, via its ``causal`` method);
* an update rule of a plugin: its own ``causal(k, v, q, gates, attn)`` method where it has one, else the loop,
  with a ``SlowCausalFormWarning`` (once per rule).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .chunked import _chunks
from .normalisations import EPS
from .rules import DeltaRule, FWMRule, SumRule, UpdateRule, attn_key_denominators

# Steps per chunk of the chunked forms (a memory's ``causal_chunk`` overrides them). Measured at B·H = 128,
# T = 1024, F = V = 64 (fwd + bwd, one thread, CPU time): the sum rule 1054 / 848 / 753 / 975 ms at C = 32 / 64 /
# 128 / 256 (1232 ms at C = 128 for F = 128, the best too); the delta rule, whose C×C terms weigh more,
# ~1400 ms at C = 32 against ~1700 at 64.
SUM_CHUNK = 128
DELTA_CHUNK = 32


class SlowCausalFormWarning(UserWarning):
    """A memory or update rule has no all-positions form of its own and runs through a slow loop."""


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, SlowCausalFormWarning, stacklevel=3)


def gate_width(mem, name: str, d_key: int) -> int:
    """The width of ``mem``'s gate ``name`` for keys of width ``d_key``: its ``gate_dim`` (``Memory.gate_dim``),
    or 1 for a module without one: what the models project and the contract helpers draw."""
    dim = getattr(mem, "gate_dim", None)
    return dim(name, d_key) if callable(dim) else 1


def gate_widths(mem, keys, gates) -> dict[str, int]:
    """Each gate's width for ``keys`` (B, T, K) (``gate_width``); {} where keys are not (B, T, K)."""
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3:
        return {}
    return {name: gate_width(mem, name, keys.shape[-1]) for name in gates}


def check_inputs(keys, values, queries, betas=None, gates=None, widths=None) -> None:
    """Raise one ValueError naming the field whose shape breaks keys (B, T, K), values (B, T, V),
    queries (B, T, K), betas (B, T) and every gate: (B, T), or (B, T, width) where ``widths`` {name: width}
    gives a width above 1 (a gate of one value per feature, ``Memory.gate_dim``)."""
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3:
        raise ValueError(f"causal: keys must be a (B, T, K) tensor, got {_shape(keys)}")
    B, T, K = keys.shape
    expect = {"values": (values, (B, T, None)), "queries": (queries, (B, T, K))}
    if betas is not None:
        expect["betas"] = (betas, (B, T))
    for name, g in (gates or {}).items():
        width = (widths or {}).get(name, 1)
        expect[f"gate {name!r}"] = (g, (B, T) if width == 1 else (B, T, width))
    for field, (x, want) in expect.items():
        ok = isinstance(x, torch.Tensor) and x.dim() == len(want) and all(
            w is None or s == w for s, w in zip(x.shape, want, strict=True))
        if not ok:
            dims = ", ".join("V" if w is None else str(w) for w in want)
            raise ValueError(f"causal: {field} must be ({dims}) for keys {tuple(keys.shape)}, got {_shape(x)}")


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


# ---- softmax ---------------------------------------------------------------------------------------------
def softmax_causal(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_{j≤t} softmax_j(k_j·q_t/√K) v_j. keys, queries (B, T, K), values (B, T, V) -> (B, T, V)."""
    # (B, 1, T, ·): with a head axis (and V = K) the CPU dispatches to its flash kernel, which never forms the
    # T×T scores; 3-d inputs went to the math path, 7x slower at T = 1024 (B·H = 128, K = 64)
    y = F.scaled_dot_product_attention(queries[:, None], keys[:, None], values[:, None], is_causal=True,
                                       scale=1.0 / math.sqrt(keys.shape[-1]))
    return y[:, 0]


def softmax_causal_reference(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The same, one position at a time: the spec of ``softmax_causal``."""
    ys = []
    for t in range(keys.shape[1]):
        s = (keys[:, : t + 1] * queries[:, t, None, :]).sum(-1) / math.sqrt(keys.shape[-1])  # (B, t+1)
        ys.append((torch.softmax(s, dim=-1)[..., None] * values[:, : t + 1]).sum(1))  # (B, V)
    return torch.stack(ys, dim=1)


# ---- the sum rule ----------------------------------------------------------------------------------------
class _SumCausal(torch.autograd.Function):
    """Y = tril(Q Kᵀ) V + Q S per chunk (S: the exclusive prefix sum of the chunks' Kᵀ V), with a hand-written
    backward: a dozen batched ops where autograd of the same formula ran three times as many."""

    @staticmethod
    def forward(ctx, k, v, q, chunk):
        B, T, _ = k.shape
        C = max(1, min(chunk, T))
        n = math.ceil(T / C)
        K, Vc, Q = _chunks(k, n, C), _chunks(v, n, C), _chunks(q, n, C)  # (B, n, C, F|V); zero-padded
        A = (Q @ K.transpose(-1, -2)).tril_()  # (B, n, C, C): q_i·k_j for j ≤ i (a position reads its own write)
        kv = K.transpose(-1, -2) @ Vc  # (B, n, F, V): each chunk's writes
        # the state each chunk starts from: a shifted cumsum (cumsum - kv would cancel large sums in float32)
        S = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1]], dim=1).cumsum(1)
        Y = torch.baddbmm((Q @ S).flatten(0, 1), A.flatten(0, 1), Vc.flatten(0, 1))  # (B·n, C, V)
        ctx.save_for_backward(K, Vc, Q, A, S)
        return Y.reshape(B, n * C, -1)[:, :T]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        K, Vc, Q, A, S = ctx.saved_tensors
        B, n, C, _ = K.shape
        T = gy.shape[1]
        dY = _chunks(gy, n, C)  # (B, n, C, V)
        dA = (dY @ Vc.transpose(-1, -2)).tril_()
        dS = Q.transpose(-1, -2) @ dY  # (B, n, F, V)
        # a chunk's writes reach every later chunk's reads: dkv_i = Σ_{j>i} dS_j
        dkv = torch.cat([dS[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(dS[:, :1])], dim=1)
        dQ = torch.baddbmm((dY @ S.transpose(-1, -2)).flatten(0, 1), dA.flatten(0, 1), K.flatten(0, 1))
        dK = torch.baddbmm((Vc @ dkv.transpose(-1, -2)).flatten(0, 1), dA.transpose(-1, -2).flatten(0, 1),
                           Q.flatten(0, 1))
        dV = torch.baddbmm((K @ dkv).flatten(0, 1), A.transpose(-1, -2).flatten(0, 1), dY.flatten(0, 1))
        return tuple(x.reshape(B, n * C, -1)[:, :T] for x in (dK, dV, dQ)) + (None,)


def sum_causal(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, eps: float | None = None,
               chunk: int | None = None) -> torch.Tensor:
    """Causal linear attention: y_t = W_t q_t [/ (z_t·q_t + eps)] with W_t = Σ_{j≤t} v_j ⊗ k_j, z_t = Σ_{j≤t} k_j.

    Per chunk of C steps: y = tril(Q Kᵀ) V + Q S, where S (F, V) holds the writes of every earlier chunk (an
    exclusive prefix sum over chunks of Kᵀ V). The normaliser rides along as one more value column of ones:
    its read is z_t·q_t. Exact; O(T·C·F + T·F·V) work, no sequential loop, n = ⌈T/C⌉ states of F×V kept for
    the backward.

    Args:
        k: keys (B, T, F). v: values (B, T, V). q: queries (B, T, F), already through φ and the normalisation.
        eps: with the attention normaliser, its eps; None for none. chunk: C (default ``SUM_CHUNK``).

    Returns:
        (B, T, V).
    """
    chunk = chunk or SUM_CHUNK
    if eps is None:
        return _SumCausal.apply(k, v, q, chunk)
    y = _SumCausal.apply(k, torch.cat([v, v.new_ones(*v.shape[:2], 1)], dim=-1), q, chunk)  # (B, T, V + 1)
    return y[..., :-1] / (y[..., -1:] + eps)


# ---- the delta rule --------------------------------------------------------------------------------------
@torch.no_grad()
def unit_lower_inverse(N: torch.Tensor) -> torch.Tensor:
    """(I + N)⁻¹ for strictly lower-triangular N (..., C, C), by batched matmuls alone (no autograd).

    Recursive doubling of the block size (blocked forward substitution, as LAPACK's trtri):
    [[A, 0], [G, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹ G A⁻¹, D⁻¹]], all blocks of one size at once, ⌈log₂ C⌉ levels, written
    in place. Not a batched triangular solve: on a busy 2-core machine MKL's per-matrix threading made 512
    solves of 64×64 take 0.2-1.7 s at 2 threads against 0.04 s at one. Not the finite series Σ(-N)^i either,
    whose powers cancel catastrophically (``chunked.unit_triangular_inverse``).
    """
    C = N.shape[-1]
    P = 1 << max(C - 1, 0).bit_length()  # padded to a power of 2: [[M, 0], [0, I]]⁻¹ = [[M⁻¹, 0], [0, I]]
    if P != C:
        N = F.pad(N, (0, P - C, 0, P - C))
    batch = N.shape[:-2]
    X = torch.eye(P, dtype=N.dtype, device=N.device).expand(*batch, P, P).contiguous()
    b = 1
    while b < P:
        Xb, G = _diagonal_blocks(X, 2 * b), _diagonal_blocks(N, 2 * b)  # views (..., P / 2b, 2b, 2b)
        Xb[..., b:, :b] = -(Xb[..., b:, b:] @ G[..., b:, :b] @ Xb[..., :b, :b])  # writes into X
        b *= 2
    return X[..., :C, :C]


def _diagonal_blocks(M: torch.Tensor, size: int) -> torch.Tensor:
    """The size×size diagonal blocks of M (..., P, P) as a view (..., P / size, size, size)."""
    nb = M.shape[-1] // size
    return torch.diagonal(M.view(*M.shape[:-2], nb, size, nb, size), dim1=-4, dim2=-2).movedim(-1, -3)


def _chunk_major(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    """(B, T, ...) -> (n, B, C, ...), contiguous and zero-padded at the end (``chunked._chunks``, chunk axis
    first): every per-chunk slice of the loop over chunks is then one contiguous batch, and the state that loop
    writes (n, B, F, V) is read by the batched products without a transposing copy."""
    return _chunks(x, n, C).transpose(0, 1).contiguous()


def _unchunk(x: torch.Tensor, T: int) -> torch.Tensor:
    """(n, B, C, ...) -> (B, T, ...): the inverse of ``_chunk_major`` (the padding dropped)."""
    n, B, C = x.shape[:3]
    return x.transpose(0, 1).reshape(B, n * C, *x.shape[3:])[:, :T]


class _DeltaCausal(torch.autograd.Function):
    """The chunkwise delta rule (``delta_causal``) with a hand-written backward: the adjoint of the state,
    g = ∂ℓ/∂S, runs backwards over the chunks with two small matmuls each; everything else is batched over the
    chunks. Per chunk: G = B Kᵀ, N = tril₋₁(diag(β) G), X = (I + N)⁻¹, T = X diag(β), W = T B, U = T V;
    δ = U - W S, S' = S + Kᵀ δ; Y = Q S + tril(Q Kᵀ) δ. ``b`` None: the read keys are the keys (G = K Kᵀ).
    Every tensor is chunk-major, (n, B, C, ·) (``_chunk_major``): one copy of each input and output instead of
    strided slices and transposing copies of the states inside the products."""

    @staticmethod
    def forward(ctx, k, b, v, q, beta, chunk):
        B, T, Fd = k.shape
        Vd = v.shape[-1]
        C = max(1, min(chunk, T))
        n = math.ceil(T / C)
        K, Q, Vc = (_chunk_major(x, n, C) for x in (k, q, v))  # (n, B, C, ·)
        Bk = K if b is None else _chunk_major(b, n, C)
        be = _chunk_major(beta, n, C)  # (n, B, C)
        G = Bk @ K.mT  # (n, B, C, C)
        X = unit_lower_inverse((be[..., None] * G).tril_(-1))
        Tm = X * be[..., None, :]
        W, U = Tm @ Bk, Tm @ Vc  # (n, B, C, F), (n, B, C, V)
        S = k.new_empty(n, B, Fd, Vd)  # S[i]: the state chunk i starts from
        S[0] = 0
        D = U  # D[i]: chunk i's writes δ = U[i] - W[i] S[i], in place of U (not needed after)
        for i in range(n):
            if i:  # D[0] = U[0]: S[0] = 0
                D[i].baddbmm_(W[i], S[i], alpha=-1)
            if i + 1 < n:
                torch.baddbmm(S[i], K[i].mT, D[i], out=S[i + 1])
        QK = (Q @ K.mT).tril_()  # the diagonal too: a position reads after its own write
        Y = torch.baddbmm((Q @ S).flatten(0, 1), QK.flatten(0, 1), D.flatten(0, 1))
        ctx.save_for_backward(K, None if b is None else Bk, Q, Vc, be, G, X, W, S, D, QK)
        return _unchunk(Y.view(n, B, C, Vd), T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        K, Bk, Q, Vc, be, G, X, W, S, D, QK = ctx.saved_tensors
        tied = Bk is None
        Bk = K if tied else Bk
        n, B, C, Fd = K.shape
        T = gy.shape[1]
        dY = _chunk_major(gy, n, C)  # (n, B, C, V)
        dQK = (dY @ D.mT).tril_()
        dQ = torch.baddbmm((dY @ S.mT).flatten(0, 1), dQK.flatten(0, 1), K.flatten(0, 1)).view(n, B, C, Fd)
        dK = dQK.mT @ Q
        dD = QK.mT @ dY
        dS = Q.mT @ dY  # (n, B, F, V): what chunk i reads from its incoming state directly
        # the adjoint of the state, in place of dS: dS[i] becomes ∂ℓ/∂S_i (S_i enters chunk i): its direct reads,
        # plus ∂ℓ/∂S_{i+1} (S_{i+1} = S_i + Kᵀ δ), minus Wᵀ ∂ℓ/∂δ (δ = U - W S_i)
        for i in range(n - 1, -1, -1):
            if i + 1 < n:
                dD[i].baddbmm_(K[i], dS[i + 1])  # S_{i+1} = S_i + Kᵀ δ
            if i:  # (S_0 = 0 needs no adjoint)
                if i + 1 < n:
                    dS[i] += dS[i + 1]
                dS[i].baddbmm_(W[i].mT, dD[i], alpha=-1)
        if n > 1:
            dK[:-1] += D[:-1] @ dS[1:].mT
        dW = -(dD @ S.mT)
        Tm = X * be[..., None, :]
        dB, dV = Tm.mT @ dW, Tm.mT @ dD  # W = T B, U = T V
        dTm = dW @ Bk.mT + dD @ Vc.mT
        dbeta = (dTm * X).sum(-2)  # T = X diag(β)
        dN = (-(X.mT @ (dTm * be[..., None, :]) @ X.mT)).tril_(-1)  # X = (I + N)⁻¹, N strictly lower
        dbeta += (dN * G).sum(-1)  # N = tril₋₁(diag(β) G)
        dG = dN * be[..., None]
        if tied:  # G = K Kᵀ
            dK += dB + (dG + dG.mT) @ K
            dB = None
        else:  # G = B Kᵀ
            dB += dG @ K
            dK += dG.mT @ Bk
        out = [None if x is None else _unchunk(x, T) for x in (dK, dB, dV, dQ)]
        return (*out, _unchunk(dbeta, T), None)


def delta_causal(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, beta: torch.Tensor, attn: bool = False,
                 chunk: int | None = None) -> torch.Tensor:
    """The delta rule read at every position, W_t = W_{t-1} + β_t (v_t - W_{t-1} b_t) ⊗ φ_t, y_t = W_t q_t, with
    read key b_t = φ_t; with the attention normaliser (PAPER §1.5) b_t = φ_t / c_t, c_t = z_{t-1}·φ_t (1 at
    t = 0), then y_t = W_t q_t / (z_t·q_t + eps).

    The chunkwise WY / UT form of Yang et al. 2024 (PAPER §5), as ``chunked.delta_chunkwise``: within a chunk
    with incoming state S, the writes are δ = U - W Sᵀ with U = T V, W = T B, T = (I + tril₋₁(diag(β) B Kᵀ))⁻¹
    diag(β). The loop over chunks carries only the state, Sᵀ ← Sᵀ + Kᵀ δ; the reads, O = Q Sᵀ + tril(Q Kᵀ) δ,
    are batched over all chunks after it. T from ``unit_lower_inverse``; a hand-written backward.

    k, q (B, T, F); v (B, T, V); beta (B, T) -> (B, T, V).
    """
    b = k * attn_key_denominators(k).reciprocal()[..., None] if attn else None
    y = _DeltaCausal.apply(k, b, v, q, beta, chunk or DELTA_CHUNK)
    if attn:
        y = y / ((q * k.cumsum(1)).sum(-1, keepdim=True) + EPS)
    return y


# ---- any rule, by its step function ----------------------------------------------------------------------
def _run_steps(rule: UpdateRule, attn: bool, t0: int, state: dict, k, v, q, gates: dict):
    """Steps t0 .. t0 + len - 1 of ``rule`` from ``state``, each followed by the read of its query.
    Returns (state, y (B, len, V))."""
    names = list(gates)
    # unbind, not [:, t]: indexing inside an autograd loop makes the backward quadratic in T
    per_step = zip(k.unbind(1), v.unbind(1), q.unbind(1), *(gates[n].unbind(1) for n in names), strict=True)
    ys = []
    for i, (k_t, v_t, q_t, *g_t) in enumerate(per_step):
        state, _ = rule.step(state, k_t, v_t, dict(zip(names, g_t, strict=True)), t0 + i, attn)
        ys.append(rule.read(state, q_t[:, None, :], attn))  # (B, 1, V)
    return state, torch.cat(ys, dim=1)


def causal_loop(rule: UpdateRule, k, v, q, gates: dict, attn: bool, checkpointed: bool = False) -> torch.Tensor:
    """The spec: every step of ``rule`` (its ``step``, as ``reference.reference_loop`` runs it), each followed by
    its ``read`` with that position's query. k, q (B, T, F); v (B, T, V); gates {name: (B, T), or (B, T, F)
    for a width-F gate} -> (B, T, V).

    ``checkpointed``: run segments of ⌈√T⌉ steps under activation checkpointing, so that the backward keeps
    O(√T) states alive instead of T (each segment's steps are run again in the backward).
    """
    B, T, Fd = k.shape
    state = rule.init_state(B, v.shape[-1], Fd, k, attn)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (k, v, q, *gates.values()))
    if not (checkpointed and grad) or T < 4:
        return _run_steps(rule, attn, 0, state, k, v, q, gates)[1]
    size = math.ceil(math.sqrt(T))
    ys = []
    for t0 in range(0, T, size):
        part = slice(t0, t0 + size)
        state, y = checkpoint(_run_steps, rule, attn, t0, state, k[:, part], v[:, part], q[:, part],
                              {n: g[:, part] for n, g in gates.items()}, use_reentrant=False)
        ys.append(y)
    return torch.cat(ys, dim=1)


def _defined_in(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def _sum_form(rule, k, v, q, gates, attn, chunk):
    return sum_causal(k, v, q, EPS if attn else None, chunk)


def _delta_form(rule, k, v, q, gates, attn, chunk):
    return delta_causal(k, v, q, gates["beta"], attn, chunk)


def _fwm_form(rule, k, v, q, gates, attn, chunk):
    # the norm clipping admits no parallel form: the recurrence itself, memory-light
    return causal_loop(rule, k, v, q, gates, attn, checkpointed=True)


_BUILT_IN_FORMS: dict[type, Callable] = {SumRule: _sum_form, DeltaRule: _delta_form, FWMRule: _fwm_form}


def built_in_form(rule: UpdateRule) -> Callable | None:
    """The fast form of a built-in rule, where ``rule``'s class keeps that rule's ``step`` and ``read`` (a
    subclass that changes either is another rule, and gets none)."""
    cls = type(rule)
    for base, form in _BUILT_IN_FORMS.items():
        if _defined_in(cls, "step") is base and _defined_in(cls, "read") is _defined_in(base, "read"):
            return form
    return None


def rule_causal(rule: UpdateRule, k, v, q, gates: dict, attn: bool, chunk: int | None = None) -> torch.Tensor:
    """The rule's all-positions form on features: a built-in's fast form, a plugin rule's own
    ``causal(k, v, q, gates, attn)``, or else the checkpointed loop with a warning (once per rule).
    k, q (B, T, F); v (B, T, V); gates {name: (B, T) or (B, T, F)} -> (B, T, V)."""
    own = getattr(rule, "causal", None)
    if callable(own):  # a rule's own form; one that takes ``chunk`` gets the memory's (the contract tests vary it)
        takes_chunk = chunk is not None and "chunk" in inspect.signature(own).parameters
        return own(k, v, q, gates, attn, chunk=chunk) if takes_chunk else own(k, v, q, gates, attn)
    form = built_in_form(rule)
    if form is not None:
        return form(rule, k, v, q, gates, attn, chunk)
    name = rule.name or type(rule).__name__
    warn_once(f"rule:{type(rule).__module__}.{type(rule).__qualname__}",
              f"update rule {name!r} has no all-positions causal form (a method causal(k, v, q, gates, attn)); "
              "running its step function at every position (slow)")
    return causal_loop(rule, k, v, q, gates, attn, checkpointed=True)


# ---- any memory, by reads of each prefix -----------------------------------------------------------------
def prefix_reads(read: Callable, keys, values, queries, betas=None, gates=None) -> torch.Tensor:
    """y_t = read(keys[:, :t+1], values[:, :t+1], betas[:, :t+1], queries[:, t:t+1], gates[:, :t+1]): a
    memory's read-after-the-last-write form applied to every prefix (T calls). -> (B, T, V)."""
    gates = gates or {}
    ys = []
    for t in range(keys.shape[1]):
        upto = slice(0, t + 1)
        ys.append(read(keys[:, upto], values[:, upto], None if betas is None else betas[:, upto],
                       queries[:, t: t + 1], **{n: g[:, upto] for n, g in gates.items()}))
    return torch.cat(ys, dim=1)
