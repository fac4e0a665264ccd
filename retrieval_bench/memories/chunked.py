"""Exact fast forms of the update rules (DESIGN §4): chunked, matmul-rich, memory-light.

Every function here computes the same numbers as the per-step loop of ``reference.py`` (up to float rounding);
none approximates. Orientation as in the paper: the fast weight W ∈ R^{V×F} is read as W φ(q). FWM's loop, whose
norm clipping admits no parallel form, has its memory-light backward in ``checkpointed.py``.

The generalised delta rule covers both the plain and the attention-normalised delta rule (PAPER §1.5):

    W_t = W_{t-1} (I - β_t b_t a_tᵀ) + β_t v_t a_tᵀ

with write key a_t and read key b_t (b = a for the plain rule, b_t = a_t / c_t with the attention normaliser).

* ``delta_query_read``: the training form. The query is read once after the last write, so the query travels
  backwards as an F-vector, c_{t-1} = c_t - s_t b_t with s_t = β_t a_t·c_t, and ŷ = Σ_t s_t v_t. Steps are
  grouped in chunks of C: within a chunk the C scalars s solve a small unit-triangular system whose inverse
  T (C×C) does not depend on the query, so all T are formed at once and the sequential part is three small
  matmuls per chunk. A hand-written backward (the adjoint recursion of the same scalars, which runs forward in
  time with the transposed T) keeps only O(L·Q) numbers plus one F-vector per chunk, never a V×F state.
* ``delta_chunkwise``: the all-positions form of Yang et al. 2024 (WY / UT transform; PAPER §5), for tasks
  that read at every position, and to build the final state W explicitly (evaluation with many queries).
* ``sum_read``: the sum rule's read, Σ_t v_t (a_t·q), with a backward that hands the feature map a
  contiguous gradient.

The retrieval model's values are one-hots; where it has marked them (``mark_one_hot``) the reads gather and
scatter by value id instead of reading B·L·V floats.
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


# One-hot values. The retrieval model's values are one-hots (B, L, V) of value ids; reading them densely costs
# a pass over B·L·V floats per product, where a gather or scatter over the ids costs B·L·Q. The model marks
# the one-hot tensor it builds with its ids and version; a later in-place change bumps the version and drops
# the mark, so a stale mark is never used. Gathers are exact; scatter-adds sum repeated ids in another order.
_ONE_HOT_MARK = "_retrieval_bench_one_hot"


def mark_one_hot(v: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Record that ``v`` (..., V) is exactly onehot(ids) (...,), so that reads may gather instead."""
    setattr(v, _ONE_HOT_MARK, (ids, v._version))
    return v


def one_hot_ids(v: torch.Tensor) -> torch.Tensor | None:
    """The ids (B, L) that ``v`` is the one-hot of, if so marked and unchanged since, and v needs no grad."""
    mark = getattr(v, _ONE_HOT_MARK, None)
    if mark is None or mark[1] != v._version or v.requires_grad:
        return None
    return mark[0]


def _values_read(S: torch.Tensor, v: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Σ_t S[b, q, t] v[b, t]: S (B, Q, L') with L' >= L (extra columns are zero), v (B, L, V) -> (B, Q, V)."""
    L = v.shape[1]
    if ids is None:
        return S[..., :L] @ v
    B, Q = S.shape[:2]
    y = S.new_zeros(B, Q, v.shape[2])
    return y.scatter_add_(2, ids[:, None, :].expand(B, Q, L), S[..., :L])


def _values_grad(gy: torch.Tensor, v: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """v[b, t]·gy[b, q] for every t: gy (B, Q, V), v (B, L, V) -> (B, Q, L)."""
    if ids is None:
        return gy @ v.transpose(1, 2)
    B, Q = gy.shape[:2]
    return torch.gather(gy, 2, ids[:, None, :].expand(B, Q, ids.shape[1]))


def unit_triangular_inverse(N: torch.Tensor, upper: bool) -> torch.Tensor:
    """(I + N)⁻¹ for strictly triangular N (..., C, C), by a batched triangular solve.

    Not by the finite series Σ_i (-N)^i: with large, correlated keys (l2-normalised positive features) the
    powers of N grow combinatorially and cancel, which lost all float32 accuracy at C = 64; the solve was
    also faster for C >= 8.
    """
    C = N.shape[-1]
    eye = torch.eye(C, dtype=N.dtype, device=N.device)
    return torch.linalg.solve_triangular(N + eye, eye.expand_as(N), upper=upper, unitriangular=True)


def _small_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x (..., P, C) @ m (..., C, D) for many small matrices: broadcast and sum where P or C is 1, since a
    batched GEMM of thousands of 1-row (or rank-1) products is dominated by its per-matrix overhead."""
    if x.shape[-2] == 1:
        return (x.transpose(-1, -2) * m).sum(-2, keepdim=True)
    if x.shape[-1] == 1:
        return x * m
    return x @ m


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
        ids = one_hot_ids(v)
        AA = A @ A.transpose(-1, -2)  # (B, n, C, C), symmetric
        # U[i, j] = a_i·b_j (j > i): how a later write of the chunk changes what an earlier step's query sees.
        U = AA.triu(1) if rh is None else AA.triu(1) * rh[..., None, :]
        T = unit_triangular_inverse(be[..., :, None] * U, upper=True)
        Mb = T.transpose(-1, -2) * be[..., :, None]  # diag(β) Tᵀ: s = p Mb for p = c_end Aᵀ
        # The sequential part: three small matmuls per chunk; per-chunk tensors by unbind (views), results
        # collected in lists and stacked once.
        A_k, Mb_k = A.unbind(1), Mb.unbind(1)
        rh_k = [None] * n if rh is None else rh[:, :, None, :].unbind(1)
        c = q
        Ps, Ss, Cs = [], [], []
        for k in range(n - 1, -1, -1):
            Cs.append(c)
            p = torch.bmm(c, A_k[k].transpose(1, 2))  # (B, Q, C); a row-vector product when Q = 1
            s = torch.bmm(p, Mb_k[k])
            Ps.append(p)
            Ss.append(s)
            c = torch.baddbmm(c, s if rh_k[k] is None else s * rh_k[k], A_k[k], alpha=-1)
        S = torch.stack(Ss[::-1], dim=1)  # (B, n, Q, C)
        P0 = torch.stack(Ps[::-1], dim=1)  # c_end·a_t, kept for the backward
        c_end = torch.stack(Cs[::-1], dim=1)  # (B, n, Q, F)
        y = _values_read(S.permute(0, 2, 1, 3).reshape(B, Q, n * C), v, ids)  # (B, Q, V): Σ_t s_t v_t
        ctx.save_for_backward(A, rh, be, v, ids, AA, U, T, S, P0, c_end)
        ctx.shape = (B, L, F, Q, n, C)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        A, rh, be, v, ids, AA, U, T, S, P0, c_end = ctx.saved_tensors
        B, L, F, Q, n, C = ctx.shape
        need_a, need_rho, need_v, need_beta, need_q = ctx.needs_input_grad[:5]
        S_rows = S.permute(0, 2, 1, 3).reshape(B, Q, n * C)  # (B, Q, nC)
        gv = (S_rows.transpose(1, 2) @ gy)[:, :L] if need_v else None  # (B, L, V)
        gS = _values_grad(gy, v, ids)  # (B, Q, L): v_t·gy
        if n * C > L:
            gS = torch.cat([gS, gS.new_zeros(B, Q, n * C - L)], dim=2)
        gS = gS.reshape(B, Q, n, C).permute(0, 2, 1, 3)  # (B, n, Q, C)
        # Adjoint of c_{t-1} = c_t - s_t b_t, s_t = β_t a_t·c_t. With r_t the total gradient of s_t and g the
        # gradient of c: g_t = g_{t-1} + r_t β_t a_t, r_t = gS_t - b_t·g_{t-1}. It runs forward in time, and
        # within a chunk r solves the transposed system: r = (gS - ρ ⊙ g_start Aᵀ) T.
        gST = _small_matmul(gS, T)  # (B, n, Q, C)
        A_k, T_k, gST_k = A.unbind(1), T.unbind(1), gST.unbind(1)
        be_k = be[:, :, None, :].unbind(1)
        rh_k = [None] * n if rh is None else rh[:, :, None, :].unbind(1)
        g = gy.new_zeros(B, Q, F)
        Rs, G0s, Gs = [], [], []
        for k in range(n):
            Gs.append(g)
            gA = torch.bmm(g, A_k[k].transpose(1, 2))  # (B, Q, C)
            G0s.append(gA)
            r = torch.baddbmm(gST_k[k], gA if rh_k[k] is None else gA * rh_k[k], T_k[k], alpha=-1)
            Rs.append(r)
            g = torch.baddbmm(g, r * be_k[k], A_k[k])
        R = torch.stack(Rs, dim=1)  # (B, n, Q, C)
        G0 = torch.stack(G0s, dim=1)  # g_start·a_t
        g_start = torch.stack(Gs, dim=1)  # (B, n, Q, F)
        gq = g if need_q else None
        RtS = _small_matmul(R.transpose(-1, -2), S)  # (B, n, C, C): [i, j] = Σ_q r_i s_j
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
            P = P0 - _small_matmul(S, U.transpose(-1, -2))  # (B, n, Q, C)
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
    Qc = _chunks(q, n, C) if q is not None else None
    # the diagonal too in Q Kᵀ: a position reads after its own write
    QK = (Qc @ K.transpose(-1, -2)).tril() if q is not None else None  # (B, n, C, C)
    St = k.new_zeros(B, F, Vd) if initial_state is None else initial_state.transpose(1, 2)  # Sᵀ (B, F, V)
    tensors = (k, v, beta, b, St) + ((q,) if q is not None else ())
    in_place = not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))
    if in_place and initial_state is not None:
        St = St.clone()  # the caller's state stays as it was
    outs = []
    # unbind, not [:, i]: indexing inside an autograd loop makes the backward quadratic in the chunk count.
    none = [None] * n
    per_chunk = zip(Wm.unbind(1), Um.unbind(1), K.unbind(1), none if q is None else Qc.unbind(1),
                    none if q is None else QK.unbind(1), strict=True)
    for w, u, kc, qc, qk in per_chunk:
        delta = torch.baddbmm(u, w, St, alpha=-1)  # (B, C, V): U - W Sᵀ
        if qc is not None:
            outs.append(torch.baddbmm(torch.bmm(qc, St), qk, delta))
        if in_place:  # without autograd the state can be updated where it is
            St.baddbmm_(kc.transpose(1, 2), delta)
        else:
            St = torch.baddbmm(St, kc.transpose(1, 2), delta)
    y = torch.cat(outs, dim=1)[:, :L] if q is not None else None
    return y, St.transpose(1, 2)


def _score_read_forward(s, v, ids, eps):
    """ŷ = Σ_t v_t s_t [/ (Σ_t s_t + eps)] from scores s (B, L, Q). Returns y (B, Q, V) and the denominator."""
    y = _values_read(s.transpose(1, 2), v, ids)  # (B, Q, V)
    den = None
    if eps is not None:
        den = s.sum(1)[..., None] + eps  # (B, Q, 1)
        y = y / den
    return y, den


def _score_read_backward(gy, s, v, ids, y, den, need_v):
    """Gradients of ``_score_read_forward`` w.r.t. the scores (B, L, Q) and the values (or None)."""
    g_num = gy if den is None else gy / den  # (B, Q, V)
    gs = _values_grad(g_num, v, ids).transpose(1, 2)  # (B, L, Q)
    if den is not None:
        gs = gs - (gy * y).sum(-1)[:, None, :] / den.transpose(1, 2)  # through the normaliser
    return gs, (s @ g_num if need_v else None)


class _SumRead(torch.autograd.Function):
    """ŷ = Σ_t v_t (a_t·q) [/ (Σ_t a_t·q + eps)]: the sum rule's read without W (see ``sum_read``)."""

    @staticmethod
    def forward(ctx, a, v, q, eps):
        s = a @ q.transpose(1, 2)  # (B, L, Q): a column mat-vec when Q = 1, which is fast
        ids = one_hot_ids(v)
        y, den = _score_read_forward(s, v, ids, eps)
        ctx.save_for_backward(a, v, ids, q, s, y, den)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        a, v, ids, q, s, y, den = ctx.saved_tensors
        need_a, need_v, need_q = ctx.needs_input_grad[:3]
        gs, gv = _score_read_backward(gy, s, v, ids, y, den, need_v)
        Q = q.shape[1]
        # Q = 1: broadcasting, not a bmm with an inner dimension of 1, and a contiguous (B, L, F) gradient
        # (autograd of q @ aᵀ hands the feature map a transposed one).
        ga = (gs * q if Q == 1 else gs @ q) if need_a else None
        gq = gs.transpose(1, 2) @ a if need_q else None
        return ga, gv, gq, None


class _ScoreRead(torch.autograd.Function):
    """``sum_read`` from precomputed scores s_t = a_t·q (see ``score_read``)."""

    @staticmethod
    def forward(ctx, s, v, eps):
        ids = one_hot_ids(v)
        y, den = _score_read_forward(s, v, ids, eps)
        ctx.save_for_backward(v, ids, s, y, den)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        v, ids, s, y, den = ctx.saved_tensors
        gs, gv = _score_read_backward(gy, s, v, ids, y, den, ctx.needs_input_grad[1])
        return gs, gv, None


def sum_read(a: torch.Tensor, v: torch.Tensor, q: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """The sum rule's read after all writes, y = W_L q with W_L = Σ_t v_t ⊗ a_t, without W.

    Args:
        a: keys (B, L, F). v: values (B, L, V). q: queries (B, Q, F).
        eps: with the attention normaliser, y = W q / (z·q + eps) with z = Σ_t a_t; None for none.

    Returns:
        (B, Q, V).
    """
    return _SumRead.apply(a, v, q, eps)


def score_read(s: torch.Tensor, v: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """``sum_read`` given the scores s (B, L, Q) = φ(k_t)·φ(q) directly, for feature maps whose kernel is
    cheaper than their features (FAVOR+). Returns (B, Q, V)."""
    return _ScoreRead.apply(s, v, eps)
