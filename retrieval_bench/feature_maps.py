"""Feature maps φ: (..., K) -> (..., F), PAPER §1.6.

Every map is an ``nn.Module`` with ``dim(K) -> F``. Random maps (FAVOR+) own their ``torch.Generator`` and an
explicit redraw policy, so resampling is never a hidden global side effect: the memory calls ``begin_call()``
once per forward, and keys and queries of that call share one draw.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import feature_maps


class FeatureMap(nn.Module):
    """Base class: a deterministic, parameter-free map unless a subclass says otherwise."""

    #: True where every feature is >= 0 (tanh is the exception by design).
    non_negative = True

    def dim(self, d_key: int) -> int:
        return d_key

    def begin_call(self, d_key: int, device=None, dtype=None) -> None:
        """Called once per memory forward before keys and queries are mapped (FAVOR+ redraws here)."""

    def seed(self, seed: int) -> None:
        """Seed the map's own random generator (no-op for deterministic maps)."""

    def kernel(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """φ(k_t)·φ(q) as scores (B, L, 1) for keys (B, L, K) and one query per sequence (B, 1, K), for maps
        that compute it cheaper than through their features. A map that does overrides this in the class that
        defines its ``forward``; the memory calls it after ``begin_call``, for the sum rule without key
        normalisation."""
        raise NotImplementedError


@feature_maps.register("identity")
class Identity(FeatureMap):
    non_negative = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@feature_maps.register("linear")
class EluPlusOne(FeatureMap):
    """Katharopoulos et al. 2020: φ(x) = elu(x) + 1, strictly positive, F = K."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0


@feature_maps.register("tanh")
class Tanh(FeatureMap):
    """φ(x) = tanh(x): the FWM baseline's map (signed, F = K)."""

    non_negative = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


@feature_maps.register("dpfp")
class DPFP(FeatureMap):
    """Deterministic parameter-free projection DPFP-ν (PAPER Eqs. 33-37), F = 2·K·ν.

    u = [relu(x); relu(-x)] ∈ R^{2K}; φ = concat_{j=1..ν} u ⊙ roll(u, j). ν must stay below K: a shift of K
    pairs r(a) with r(-a) and gives identically zero features.
    """

    def __init__(self, n: int = 1):
        super().__init__()
        if n < 1:
            raise ValueError(f"dpfp: nu must be >= 1, got {n}")
        self.n = n

    def dim(self, d_key: int) -> int:
        if self.n >= d_key:
            raise ValueError(f"dpfp-{self.n}: nu must be < d_key ({d_key}); larger shifts repeat or vanish")
        return 2 * d_key * self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DPFPFunction.apply(x, self.n)


class _DPFPFunction(torch.autograd.Function):
    """DPFP-ν with a hand-written backward: the same products as ``cat_j u ⊙ roll(u, j)``, written in place
    instead of through ν rolled copies, ν products and a concatenation (and their autograd), saving only u."""

    @staticmethod
    def forward(ctx, x, n):
        K = x.shape[-1]
        D = 2 * K
        # u = [relu(x); relu(-x)] (..., D), written inside u_ext = [u_{D-n..D-1}, u, u_{0..n-1}] (..., D + 2n),
        # where roll(u, ±j), j <= n, is a slice, not a copy.
        u_ext = x.new_empty(*x.shape[:-1], D + 2 * n)
        u = u_ext[..., n: n + D]
        torch.clamp_min(x, 0.0, out=u[..., :K])
        torch.neg(x, out=u[..., K:]).clamp_min_(0.0)
        u_ext[..., :n] = u[..., D - n:]
        u_ext[..., n + D:] = u[..., :n]
        out = u.new_empty(*u.shape[:-1], n, D)
        for j in range(1, n + 1):  # block j: u_i · u_{(i - j) mod D}
            torch.mul(u, u_ext[..., n - j: n - j + D], out=out[..., j - 1, :])
        ctx.save_for_backward(u_ext)
        ctx.n = n
        return out.reshape(*u.shape[:-1], n * D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (u_ext,) = ctx.saved_tensors
        n = ctx.n
        D = u_ext.shape[-1] - 2 * n
        g = g.reshape(*u_ext.shape[:-1], n, D)
        # ∂/∂u_m of Σ_i g_i u_i u_{i-j} = g_m u_{m-j} + g_{m+j} u_{m+j} (indices mod D). The first term reads
        # rolled u (slices of u_ext); the second, for m < D - j, reads slices of g and u directly, and its
        # wrapped part (m >= D - j, n(n+1)/2 products per row) is summed into the last n entries at once.
        u = u_ext[..., n: n + D]
        gu = g[..., 0, :] * u_ext[..., n - 1: n - 1 + D]
        for j in range(2, n + 1):
            gu.addcmul_(g[..., j - 1, :], u_ext[..., n - j: n - j + D])
        for j in range(1, n + 1):
            gu[..., : D - j].addcmul_(g[..., j - 1, j:], u[..., j:])
        wrap = torch.zeros(n, n, n, dtype=g.dtype, device=g.device)  # [j-1, i, p]: g_j[i] u_i lands at D-n+p
        for j in range(1, n + 1):
            for i in range(j):
                wrap[j - 1, i, i + n - j] = 1.0
        gu[..., D - n:] += torch.einsum("...ji,jip->...p", g[..., :n] * u[..., None, :n], wrap)
        K = D // 2
        # u = [relu(x); relu(-x)] >= 0, so sign(u) is relu's derivative (0 at x = 0, as torch's); a product,
        # because torch.where is several times slower here.
        return gu[..., :K] * torch.sign(u[..., :K]) - gu[..., K:] * torch.sign(u[..., K:]), None


def orthogonal_random_matrix(d: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """Ω ∈ R^{d×m}: orthogonal d×d blocks from QR of Gaussian G, columns scaled by G's row norms (chi_d)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, generator=generator)
        q, _ = torch.linalg.qr(g)
        blocks.append(q * g.norm(dim=1)[None, :])  # scale column i by the norm of row i of G
    return torch.cat(blocks, dim=1)[:, :m]


@feature_maps.register("favor")
class FavorPlus(FeatureMap):
    """FAVOR+ positive random features (Performer; PAPER Eqs. 31-32), F = 2m.

    φ(x) = exp(-|x|²/2)/√(2m) · [exp(Ωᵀx); exp(-Ωᵀx)], so E[φ(k)·φ(q)] = exp(k·q). No temperature prescale.
    The exponent is formed before exponentiating (same value, no overflow of exp(Ωᵀx) alone).

    Args:
        n: m, the number of random projections.
        redraw: ``"call"`` (a new Ω on every forward call, as the paper ran it), ``"fixed"`` (drawn once), or
            an int N (a new Ω every N training calls; eval reuses the last draw).
    """

    def __init__(self, n: int = 64, redraw: str | int = "call", seed: int = 0):
        super().__init__()
        if n < 1:
            raise ValueError(f"favor: m must be >= 1, got {n}")
        if not (redraw in ("call", "fixed") or (isinstance(redraw, int) and redraw >= 1)):
            raise ValueError(f"favor: redraw must be 'call', 'fixed' or a positive int, got {redraw!r}")
        self.m = n
        self.policy = redraw
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("omega", torch.empty(0), persistent=True)
        self._calls = 0

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def dim(self, d_key: int) -> int:
        return 2 * self.m

    def redraw(self, d_key: int | None = None) -> None:
        """Draw a new Ω now."""
        if d_key is None and self.omega.numel() == 0:
            raise ValueError("favor: the first redraw() needs d_key (no Ω has been drawn yet)")
        d = d_key if d_key is not None else self.omega.shape[0]
        device = self.omega.device
        self.omega = orthogonal_random_matrix(d, self.m, self.generator).to(device)

    def begin_call(self, d_key: int, device=None, dtype=None) -> None:
        fresh = self.omega.numel() == 0 or self.omega.shape[0] != d_key
        if self.policy == "call":
            due = True
        elif self.policy == "fixed":
            due = False
        else:
            due = self.training and self._calls % self.policy == 0
        if self.training:
            self._calls += 1
        if fresh or due:
            self.redraw(d_key)
        if dtype is not None and self.omega.dtype != dtype:
            self.omega = self.omega.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.omega.numel() == 0:
            self.begin_call(x.shape[-1])
        return _FavorFunction.apply(x, self.omega.to(x.dtype), 1.0 / math.sqrt(2 * self.m))

    def kernel(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """φ(k)·φ(q) = (1/2m) Σ_i [e^{ω_i·(k+q) - h} + e^{-ω_i·(k+q) - h}] with h = (‖k‖² + ‖q‖²)/2: m terms per
        position where the features have 2m, and no features kept."""
        if self.omega.numel() == 0:
            self.begin_call(keys.shape[-1])
        return _FavorKernel.apply(keys, queries, self.omega.to(keys.dtype))


# exp(z) rounds to exactly 0 in float32 for z <= -104 (e^-104 < 2^-150, half the smallest denormal), yet CPU
# exp takes a slow path there (4-8x): FAVOR+ exponents at large S lie mostly in that range (‖x‖²/2 ~ 0.35·S).
# (Flushing the denormal results, z in (-104, -87], to zero as well would save two more passes, but FAVOR+
# features are strictly positive, and the denormals keep them so.)
_EXP_ZERO_BELOW = -104.0


def _exp_(z: torch.Tensor) -> torch.Tensor:
    """exp of z in place (float32: exponents at or below _EXP_ZERO_BELOW give 0 by the fast path)."""
    if z.dtype != torch.float32:
        return z.exp_()
    drop = z <= _EXP_ZERO_BELOW
    F.threshold_(z, _EXP_ZERO_BELOW, 0.0)  # exp of these is 0 anyway: compute exp(0) fast instead
    return z.exp_().masked_fill_(drop, 0.0)


# The kernel only sums its terms, so it may trade exact zeros for speed: float32 exponents below -87 are raised to
# -87 (exp of it, 1.6e-38, is the smallest result on exp's fast path), which adds at most 2m·1.6e-38 to a score;
# against the attention normaliser's eps (1e-6) that is 1e-32 relative. Two passes instead of _exp_'s four.
_KERNEL_EXP_FLOOR = -87.0


def _kernel_exp_(z: torch.Tensor) -> torch.Tensor:
    return (z.clamp_(min=_KERNEL_EXP_FLOOR) if z.dtype == torch.float32 else z).exp_()


class _FavorFunction(torch.autograd.Function):
    """scale · exp(x [Ω, -Ω] - ‖x‖²/2): the same numbers as ``scale · cat([exp(xΩ - h), exp(-xΩ - h)])``,
    written into one buffer updated in place, with a backward that saves only x, Ω and the output."""

    @staticmethod
    def forward(ctx, x, omega, scale):
        m = omega.shape[1]
        proj = x @ omega  # (..., m)
        half_sq = 0.5 * (x * x).sum(-1, keepdim=True)
        # z = [p - h, -p - h] in one contiguous write: -h + p·(±1) rounds exactly as p - h and -p - h do
        sign = torch.tensor([[1.0], [-1.0]], dtype=x.dtype, device=x.device)
        z = torch.addcmul(-half_sq[..., None], proj[..., None, :], sign).reshape(*proj.shape[:-1], 2 * m)
        del proj
        phi = _exp_(z).mul_(scale)
        ctx.save_for_backward(x, omega, phi)
        return phi

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, omega, phi = ctx.saved_tensors
        m = omega.shape[1]
        gz = g * phi  # ∂φ/∂z = φ
        # z = [xΩ, -xΩ] - ‖x‖²/2: ∂/∂x = (gz₊ - gz₋) Ωᵀ - (Σ gz) x, one GEMM over m features, not 2m
        d = torch.sub(gz[..., :m], gz[..., m:])
        gx = torch.addcmul(d @ omega.t(), gz.sum(-1, keepdim=True), x, value=-1)
        gomega = None
        if ctx.needs_input_grad[1]:
            K = x.shape[-1]
            gomega = x.reshape(-1, K).t() @ d.reshape(-1, m)
        return gx, gomega, None


# Elements per block of _FavorKernel (rows of positions × m): each block's temporaries stay in cache through the
# chain of elementwise passes, where whole (B·L, m) tensors would go through main memory on every pass
# (measured at B = 32, L = 600, m = 512: 2^19 was the fastest block of 2^17 ... 2^20, 13% under no blocks).
KERNEL_BLOCK = 2**19


def _row_blocks(n: int, m: int):
    """Slices of rows covering 0..n in blocks of KERNEL_BLOCK // m rows (one row at least)."""
    block = max(1, KERNEL_BLOCK // m)
    return (slice(i, i + block) for i in range(0, n, block))


class _FavorKernel(torch.autograd.Function):
    """s_t = φ(k_t)·φ(q) for keys k (B, L, K) and one query q (B, 1, K), without the (B, L, 2m) features.

    With u_t = k_t + q, P = uΩ and h_t = (‖k_t‖² + ‖q‖²)/2 + ln 2m (the features' scale, inside the exponent
    so that no sum overflows before the features would), s_t = Σ_i (e^{P_ti - h_t} + e^{-P_ti - h_t});
    ∂s_t/∂P_ti = e^{P_ti - h_t} - e^{-P_ti - h_t} is all the backward keeps, and ∂s_t/∂h_t = -s_t.
    """

    @staticmethod
    def forward(ctx, k, q, omega):
        K, m = omega.shape
        u = (k + q).reshape(-1, K)  # (N, K), N = B·L
        h = (0.5 * ((k * k).sum(-1) + (q * q).sum(-1)) + math.log(2 * m)).reshape(-1, 1)  # (N, 1)
        diff, s = u.new_empty(u.shape[0], m), u.new_empty(u.shape[0], 1)
        for rows in _row_blocks(u.shape[0], m):
            p = u[rows] @ omega
            e_minus = _kernel_exp_(torch.sub(-h[rows], p))
            e_plus = _kernel_exp_(p.sub_(h[rows]))
            torch.add(e_plus.sum(-1, keepdim=True), e_minus.sum(-1, keepdim=True), out=s[rows])
            torch.sub(e_plus, e_minus, out=diff[rows])
        s = s.reshape(*k.shape[:-1], 1)
        ctx.save_for_backward(k, q, omega, diff, s)
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gs):
        k, q, omega, diff, s = ctx.saved_tensors
        K, m = omega.shape
        c = gs.reshape(-1, 1)
        need_omega = ctx.needs_input_grad[2]
        gu = diff.new_empty(diff.shape[0], K)
        gomega = omega.new_zeros(K, m) if need_omega else None
        u = (k + q).reshape(-1, K) if need_omega else None
        for rows in _row_blocks(diff.shape[0], m):
            gp = diff[rows] * c[rows]  # ∂/∂P of the block, (rows, m)
            torch.mm(gp, omega.t(), out=gu[rows])
            if need_omega:
                gomega.addmm_(u[rows].t(), gp)
        gu = gu.reshape(k.shape)
        gh = -(gs * s)  # (B, L, 1)
        gk = torch.addcmul(gu, gh, k) if ctx.needs_input_grad[0] else None
        gq = (gu.sum(1, keepdim=True) + gh.sum(1, keepdim=True) * q) if ctx.needs_input_grad[1] else None
        return gk, gq, gomega


def feature_map(name: str, **kwargs) -> FeatureMap:
    """Build a registered feature map by name (``"dpfp-3"``, ``"favor-64"``, ``"linear"``)."""
    cls, params = feature_maps.resolve(name)
    return cls(**{**params, **kwargs})


from . import softmax_maps as _softmax_maps  # noqa: E402,F401  (registers taylor, hedgehog)
