"""Exact fast forms of the delta-rule family and of FWM (DESIGN §4): chunked, matmul-rich, memory-light.

Every function here computes the same numbers as the per-step loop of ``reference.py`` (up to float rounding);
none approximates. Orientation as in the paper: the fast weight W ∈ R^{V×F} is read as W φ(q).

The generalised delta rule covers both the plain and the attention-normalised delta rule (PAPER §1.5):

    W_t = W_{t-1} (I - β_t b_t a_tᵀ) + β_t v_t a_tᵀ

with write key a_t and read key b_t (b = a for the plain rule, b_t = a_t / c_t with the attention normaliser).

* ``delta_query_read``: the training form. The query is read once after the last write, so the query travels
  backwards as an F-vector, c_{t-1} = c_t - s_t b_t with s_t = β_t a_t·c_t, and ŷ = Σ_t s_t v_t. Steps are
  grouped in chunks of C: within a chunk the C scalars s solve a small unit-triangular system whose inverse
  T (C×C) does not depend on the query, so all T are formed at once and the sequential part is two small
  matmuls per chunk. A hand-written backward (the adjoint recursion of the same scalars, which runs forward in
  time with the transposed T) keeps only O(L·Q) numbers plus one F-vector per chunk, never a V×F state.
* ``delta_chunkwise``: the all-positions form of Yang et al. 2024 (WY / UT transform; PAPER §5), for tasks
  that read at every position, and to build the final state W explicitly (evaluation with many queries).
* ``fwm_state``: Fast Weight Memory's loop, whose norm clipping admits no parallel form. Its backward
  recomputes states from checkpoints, so training keeps O(√L) states instead of L.
"""

from __future__ import annotations

import math

import torch

# Chunk lengths of the query-backward form. With one query per sequence (training) the sequential part is
# tiny and per-op overhead dominates, against the per-chunk C×C products (B·L·C·F multiply-adds each); with
# many queries (evaluation) the per-chunk products with the queries are GEMMs that want a longer chunk.
# Measured on 2 CPU cores at B = 32, L = 600, F = 384 (training) and 20 sequences x 200 queries (evaluation).
QUERY_CHUNK = 16
MANY_QUERIES_CHUNK = 64


def chunk_length(L: int, chunk: int) -> int:
    """The chunk length to use for L steps: ``chunk`` (capped at L), or a multiple of 8 in [chunk/2, chunk]
    that divides L where one exists, which saves the zero padding (a copy of every input). Multiples of 8:
    MKL's batched small GEMMs ran twice as fast at C = 16 as at C = 15."""
    chunk = max(1, min(chunk, L))
    for C in range(chunk - chunk % 8, (chunk + 1) // 2 - 1, -8):
        if C > 0 and L % C == 0:
            return C
    return chunk


def _chunks(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    """(B, L, ...) -> (B, n, C, ...), zero-padded at the end when n·C > L. Zero padding is an identity write
    (a = 0, β = 0, v = 0), so it changes no read and receives no gradient."""
    B, L = x.shape[:2]
    pad = n * C - L
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    return x.reshape(B, n, C, *x.shape[2:])


def unit_triangular_inverse(N: torch.Tensor, upper: bool) -> torch.Tensor:
    """(I + N)⁻¹ for strictly triangular N (..., C, C), by a batched triangular solve.

    Not by the finite series Σ_i (-N)^i: with large, correlated keys (l2-normalised positive features) the
    powers of N grow combinatorially and cancel, which lost all float32 accuracy at C = 64; the solve was
    also faster for C >= 8.
    """
    C = N.shape[-1]
    eye = torch.eye(C, dtype=N.dtype, device=N.device)
    return torch.linalg.solve_triangular(N + eye, eye.expand_as(N), upper=upper, unitriangular=True)


class _DeltaQueryRead(torch.autograd.Function):
    """ŷ = W_L q for the generalised delta rule with read key b_t = ρ_t a_t, without W (``delta_query_read``).

    Per chunk (local steps i, j; queries as rows): U[i, j] = a_i·b_j for j > i, T = (I + diag(β) U)⁻¹;
    s = (β ⊙ c_end Aᵀ) Tᵀ and c_start = c_end - (ρ ⊙ s) A.
    """

    @staticmethod
    def forward(ctx, a, rho, v, beta, q, chunk):
        B, L, F = a.shape
        Q = q.shape[1]
        C = chunk_length(L, chunk)
        n = math.ceil(L / C)
        A = _chunks(a, n, C)  # (B, n, C, F)
        be = _chunks(beta, n, C)  # (B, n, C)
        rh = None if rho is None else _chunks(rho, n, C)
        Vc = _chunks(v, n, C).reshape(B, n * C, -1)  # (B, nC, V)
        AA = A @ A.transpose(-1, -2)  # (B, n, C, C), symmetric
        # U[i, j] = a_i·b_j (j > i): how a later write of the chunk changes what an earlier step's query sees.
        U = AA.triu(1) if rh is None else AA.triu(1) * rh[..., None, :]
        T = unit_triangular_inverse(be[..., :, None] * U, upper=True)
        Tt = T.transpose(-1, -2)
        c = q
        S = q.new_empty(B, n, Q, C)
        P0 = q.new_empty(B, n, Q, C)  # c_end·a_t, kept for the backward
        c_end = q.new_empty(B, n, Q, F)
        for k in range(n - 1, -1, -1):
            c_end[:, k] = c
            A_k = A[:, k]  # (B, C, F)
            p = c @ A_k.transpose(1, 2)  # (B, Q, C); a row-vector product when Q = 1
            P0[:, k] = p
            s = (p * be[:, k, None, :]) @ Tt[:, k]
            S[:, k] = s
            c = c - (s if rh is None else s * rh[:, k, None, :]) @ A_k
        y = S.permute(0, 2, 1, 3).reshape(B, Q, n * C) @ Vc  # (B, Q, V): Σ_t s_t v_t
        ctx.save_for_backward(A, rh, be, Vc, AA, U, T, S, P0, c_end)
        ctx.shape = (B, L, F, Q, n, C)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        A, rh, be, Vc, AA, U, T, S, P0, c_end = ctx.saved_tensors
        B, L, F, Q, n, C = ctx.shape
        need_a, need_rho, need_v, need_beta, need_q = ctx.needs_input_grad[:5]
        S_rows = S.permute(0, 2, 1, 3).reshape(B, Q, n * C)  # (B, Q, nC)
        gv = (S_rows.transpose(1, 2) @ gy)[:, :L] if need_v else None  # (B, L, V)
        gS = (gy @ Vc.transpose(1, 2)).reshape(B, Q, n, C).permute(0, 2, 1, 3)  # (B, n, Q, C): v_t·gy
        # Adjoint of c_{t-1} = c_t - s_t b_t, s_t = β_t a_t·c_t. With r_t the total gradient of s_t and g the
        # gradient of c: g_t = g_{t-1} + r_t β_t a_t, r_t = gS_t - b_t·g_{t-1}. It runs forward in time, and
        # within a chunk r solves the transposed system: r = (gS - ρ ⊙ g_start Aᵀ) T.
        g = gy.new_zeros(B, Q, F)
        R = gy.new_empty(B, n, Q, C)
        G0 = gy.new_empty(B, n, Q, C)  # g_start·a_t
        g_start = gy.new_empty(B, n, Q, F)
        for k in range(n):
            g_start[:, k] = g
            A_k = A[:, k]
            gA = g @ A_k.transpose(1, 2)  # (B, Q, C)
            G0[:, k] = gA
            r = (gS[:, k] - (gA if rh is None else gA * rh[:, k, None, :])) @ T[:, k]
            R[:, k] = r
            g = g + (r * be[:, k, None, :]) @ A_k
        gq = g if need_q else None
        RtS = R.transpose(-1, -2) @ S  # (B, n, C, C): [i, j] = Σ_q r_i s_j
        M1 = RtS.triu(1)
        ga = grho = None
        if need_a:
            # Write key: β_t Σ_q r_t c_t with c_t = c_end - Σ_{j>t} s_j b_j. Read key (b_t = ρ_t a_t):
            # -ρ_t Σ_q s_t g_{t-1} with g_{t-1} = g_start + Σ_{j<t} r_j β_j a_j. Both are (C×C) @ A per chunk.
            rows = be[..., :, None] * M1
            cols = M1.transpose(-1, -2) * be[..., None, :]
            if rh is not None:
                rows = rows * rh[..., None, :]
                cols = cols * rh[..., :, None]
            rs = be[..., None, :] * R  # (B, n, Q, C)
            ss = S if rh is None else rh[..., None, :] * S
            if Q == 1:  # outer products by broadcasting: a bmm with an inner dimension of 1 is far slower
                ga = rs[:, :, 0, :, None] * c_end  # (B, n, C, F)
                ga.addcmul_(ss[:, :, 0, :, None], g_start, value=-1)
            else:
                ga = rs.transpose(-1, -2) @ c_end - ss.transpose(-1, -2) @ g_start
            ga = ga.reshape(B * n, C, F)
            ga.baddbmm_((rows + cols).reshape(B * n, C, C), A.reshape(B * n, C, F), alpha=-1)
            ga = ga.reshape(B, n * C, F)[:, :L]
        if need_rho:
            # ∂/∂ρ_t = a_t·(∂/∂b_t) = -Σ_q s_t (g_start·a_t) - Σ_{j<t} (Σ_q s_t r_j) β_j (a_j·a_t).
            grho = -((S * G0).sum(2)
                     + (M1.transpose(-1, -2) * be[..., None, :] * AA).sum(-1))
            grho = grho.reshape(B, n * C)[:, :L]
        gbeta = None
        if need_beta:
            # β_t receives r_t (a_t·c_t), with a_t·c_t = a_t·c_end - Σ_{j>t} s_j U[t, j].
            P = P0 - S @ U.transpose(-1, -2)  # (B, n, Q, C)
            gbeta = (R * P).sum(2).reshape(B, n * C)[:, :L]
        return ga, grho, gv, gbeta, gq, None


def delta_query_read(a: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, q: torch.Tensor,
                     rho: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Read W_L q after all L writes of the generalised delta rule, exactly, without forming W.

    The rule is W_t = W_{t-1}(I - β_t b_t a_tᵀ) + β_t v_t a_tᵀ with read key b_t = ρ_t a_t (ρ = 1: the plain
    delta rule; ρ_t = 1/c_t: the attention-normalised one, PAPER §1.5).

    Args:
        a: keys (B, L, F). v: values (B, L, V). beta: learning rates (B, L). q: queries (B, Q, F).
        rho: read-key scales (B, L), or None for 1. chunk: steps per chunk (default: by the number of
            queries, ``QUERY_CHUNK`` or ``MANY_QUERIES_CHUNK``).

    Returns:
        (B, Q, V): Σ_t s_t v_t with s_t = β_t a_t·c_t, c_L = q, c_{t-1} = c_t - s_t b_t.
    """
    if chunk is None:
        chunk = QUERY_CHUNK if q.shape[1] < 16 else MANY_QUERIES_CHUNK
    return _DeltaQueryRead.apply(a, rho, v, beta, q, chunk)


def delta_chunkwise(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, q: torch.Tensor | None = None,
                    chunk: int = 64, read_k: torch.Tensor | None = None,
                    initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Chunkwise (WY / UT transform) delta rule of Yang et al. 2024 (PAPER §5): every position's read.

    Recurrence (generalised by a read key b_t; b = k for the plain rule):
    W_t = W_{t-1} + β_t (v_t - W_{t-1} b_t) ⊗ k_t and y_t = W_t q_t, read after the write at t.

    Within a chunk with incoming state S, the write increments δ_i = β_i (v_i - S b_i - Σ_{j<i} δ_j k_j·b_i)
    solve a unit-triangular system, δ = U - W Sᵀ with U = T V, W = T B and T = (I + tril₋₁(diag(β) B Kᵀ))⁻¹
    diag(β); then O = Q Sᵀ + tril(Q Kᵀ) δ and the next state is S + δᵀ K. Plain torch ops, so autograd works.

    Args:
        k: write keys (B, L, F). v: values (B, L, V). beta: (B, L). q: queries, one per position (B, L, F),
            or None to build only the final state. chunk: C. read_k: read keys b (B, L, F), default ``k``.
        initial_state: W_0 (B, V, F), default zeros.

    Returns:
        (y, W): y (B, L, V) with y_t = W_t q_t (None when q is None), and the final state W_L (B, V, F).
    """
    B, L, F = k.shape
    Vd = v.shape[-1]
    C = max(1, min(chunk, L))
    n = math.ceil(L / C)
    b = k if read_k is None else read_k
    K, Bk = _chunks(k, n, C), _chunks(b, n, C)  # (B, n, C, F)
    be = _chunks(beta, n, C)[..., None]  # (B, n, C, 1)
    # T = (I + strict-lower(diag(β) B Kᵀ))⁻¹ diag(β): row i reads what the chunk's earlier writes left at b_i.
    T = unit_triangular_inverse((be * (Bk @ K.transpose(-1, -2))).tril(-1), upper=False)
    T = T * be.transpose(-1, -2)
    Wm = T @ Bk  # (B, n, C, F)
    Um = T @ _chunks(v, n, C)  # (B, n, C, V)
    if q is not None:
        Qc = _chunks(q, n, C)
        QK = (Qc @ K.transpose(-1, -2)).tril()  # (B, n, C, C), the diagonal too: reads follow the write
        # One GEMM serves both the state's correction of U and the query's read of the incoming state.
        WQ = torch.cat([Wm, Qc], dim=2)  # (B, n, 2C, F)
    else:
        WQ = Wm
    St = k.new_zeros(B, F, Vd) if initial_state is None else initial_state.transpose(1, 2)  # Sᵀ (B, F, V)
    outs = []
    # unbind, not [:, i]: indexing inside an autograd loop makes the backward quadratic in the chunk count.
    per_chunk = zip(WQ.unbind(1), Um.unbind(1), K.unbind(1), QK.unbind(1) if q is not None else [None] * n,
                    strict=True)
    for wq, u, kc, qk in per_chunk:
        prod = wq @ St  # (B, 2C, V) or (B, C, V)
        delta = u - prod[:, :C]
        if qk is not None:
            outs.append(prod[:, C:] + qk @ delta)
        St = St + kc.transpose(1, 2) @ delta
    y = torch.cat(outs, dim=1)[:, :L] if q is not None else None
    return y, St.transpose(1, 2)


class _SumRead(torch.autograd.Function):
    """ŷ = Σ_t v_t (a_t·q) [/ (Σ_t a_t·q + eps)]: the sum rule's read without W (see ``sum_read``)."""

    @staticmethod
    def forward(ctx, a, v, q, eps):
        s = a @ q.transpose(1, 2)  # (B, L, Q): a column mat-vec when Q = 1, which is fast
        y = s.transpose(1, 2) @ v  # (B, Q, V)
        den = None
        if eps is not None:
            den = s.sum(1)[..., None] + eps  # (B, Q, 1)
            y = y / den
        ctx.save_for_backward(a, v, q, s, y, den)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        a, v, q, s, y, den = ctx.saved_tensors
        need_a, need_v, need_q = ctx.needs_input_grad[:3]
        g_num = gy if den is None else gy / den  # (B, Q, V)
        gs = v @ g_num.transpose(1, 2)  # (B, L, Q)
        if den is not None:
            gs = gs - (gy * y).sum(-1)[:, None, :] / den.transpose(1, 2)  # through the normaliser
        Q = q.shape[1]
        # Q = 1: broadcasting, not a bmm with an inner dimension of 1, and a contiguous (B, L, F) gradient
        # (autograd of q @ aᵀ hands the feature map a transposed one).
        ga = (gs * q if Q == 1 else gs @ q) if need_a else None
        gv = s @ g_num if need_v else None
        gq = gs.transpose(1, 2) @ a if need_q else None
        return ga, gv, gq, None


def sum_read(a: torch.Tensor, v: torch.Tensor, q: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """The sum rule's read after all writes, y = W_L q with W_L = Σ_t v_t ⊗ a_t, without W.

    Args:
        a: keys (B, L, F). v: values (B, L, V). q: queries (B, Q, F).
        eps: with the attention normaliser, y = W q / (z·q + eps) with z = Σ_t a_t; None for none.

    Returns:
        (B, Q, V).
    """
    return _SumRead.apply(a, v, q, eps)


def fwm_segments(L: int) -> list[int]:
    """Segment lengths for FWM's checkpointed backward, longest first, summing to L.

    The backward walks segments last to first, holding the checkpoints of the segments not yet done plus the
    recomputed states of the current one. Lengths m, m-1, ..., 1 keep that sum at about m + 1 ≈ √(2L) states
    at every moment, against 2√L for equal segments.
    """
    m = math.ceil((math.sqrt(8 * L + 1) - 1) / 2)  # smallest m with m(m+1)/2 >= L
    sizes, left = [], L
    for size in range(m, 0, -1):
        take = min(size, left)
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


def _fwm_loop(a, v, beta, starts=()):
    """W_L of FWM by the loop; also the states entering the steps in ``starts`` (None before step 0)."""
    a_s, v_s, beta_s = a.unbind(1), v.unbind(1), beta[..., None].unbind(1)
    starts = set(starts)
    checkpoints = []
    W = None
    for t in range(a.shape[1]):
        if t in starts:
            checkpoints.append(W)
        if t == 0:
            W = (beta_s[0] * v_s[0])[:, :, None] * a_s[0][:, None, :]  # W_1 = β_1 v_1 ⊗ φ_1, no clipping
        else:
            W = _fwm_write(W, a_s[t], v_s[t], beta_s[t])[0]
    return W, checkpoints


class _FWMState(torch.autograd.Function):
    """W_L of Fast Weight Memory (PAPER §1.8), with a backward that recomputes states from checkpoints."""

    @staticmethod
    def forward(ctx, a, v, beta):
        sizes = fwm_segments(a.shape[1])
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        W, checkpoints = _fwm_loop(a, v, beta, starts)
        ctx.save_for_backward(a, v, beta)
        ctx.checkpoints = checkpoints  # plain attributes: freed one by one during the backward
        ctx.starts, ctx.sizes = starts, sizes
        return W

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        a, v, beta = ctx.saved_tensors
        a_s, v_s, beta_s = a.unbind(1), v.unbind(1), beta[..., None].unbind(1)
        ga, gv, gbeta = torch.zeros_like(a), torch.zeros_like(v), torch.zeros_like(beta)
        G = G.clone()
        checkpoints = ctx.checkpoints
        if checkpoints is None:  # a second backward through the graph (retain_graph): checkpoint again
            checkpoints = _fwm_loop(a, v, beta, ctx.starts)[1]
        ctx.checkpoints = None  # the local list alone holds them now: each is freed once its segment is done
        for start, size in zip(reversed(ctx.starts), reversed(ctx.sizes), strict=True):
            W = checkpoints.pop()
            # Recompute the segment's states with the forward's own ops: bit-identical to the forward's.
            states, norms, v_bars = [W], [], []
            for t in range(start, start + size):
                if t == 0:
                    W, norm, v_bar = (beta_s[0] * v_s[0])[:, :, None] * a_s[0][:, None, :], None, None
                else:
                    W, norm, v_bar = _fwm_write(W, a_s[t], v_s[t], beta_s[t])
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
                    gv[:, 0] = b_t * Ga
                    gbeta[:, 0] = (Ga * v_t).sum(-1)
                    ga[:, 0] = _vm(b_t * v_t, G)
                    break
                norm, v_bar = norms[i], v_bars[i]
                # Through W_t = W̃ / max(‖W̃‖, 1): the clamp passes the gradient where ‖W̃‖ >= 1 (torch's rule).
                lam = torch.where(norm >= 1.0, (G * W_t).sum((1, 2)), torch.zeros_like(norm))
                G = torch.addcmul(G, W_t, -lam[:, None, None]).div_(norm.clamp_min(1.0)[:, None, None])
                # Through W̃ = W_{t-1} + δ ⊗ a with δ = β v + (1 - β) v̄ - v̄ and v̄ = W_{t-1} a.
                delta = b_t * v_t + (1 - b_t) * v_bar - v_bar
                g_delta = _mv(G, a_t)
                g_vbar = -b_t * g_delta
                gv[:, t] = b_t * g_delta
                gbeta[:, t] = (g_delta * (v_t - v_bar)).sum(-1)
                ga[:, t] = _vm(delta, G) + _vm(g_vbar, W_prev)
                G.addcmul_(g_vbar[:, :, None], a_t[:, None, :])
        return ga, gv, gbeta


def fwm_state(a: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Final fast weight W_L of FWM (PAPER §1.8) after L writes, memory-light in training.

    W_1 = β_1 v_1 ⊗ a_1; then W̃ = W + (β v + (1-β) v̄ - v̄) ⊗ a with v̄ = W a, and W = W̃ / max(1, ‖W̃‖_F).
    The clipping admits no parallel form and is not cheaply invertible, so the backward recomputes each
    segment's states from a checkpoint (``fwm_segments``): O(√L) states alive instead of the loop's L.

    Args:
        a: keys (B, L, F). v: values (B, L, V). beta: (B, L).

    Returns:
        W_L (B, V, F).
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (a, v, beta)):
        return _FWMState.apply(a, v, beta)
    return _fwm_loop(a, v, beta)[0]  # no backward to come: no checkpoints
