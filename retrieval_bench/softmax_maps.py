"""Feature maps that imitate softmax attention's exp(q·k/√d): Based's second-order Taylor map and Hedgehog's
learned map.

* ``taylor-2`` (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
  tradeoff", arXiv:2402.18668): the second-order Taylor expansion of exp(s), s = q·k/√d, as a dot product of
  features.
* ``hedgehog`` (Zhang et al. 2024, "The Hedgehog & the Porcupine: expressive linear attentions with softmax
  mimicry", arXiv:2402.04347): φ(x) = [softmax(Wx + b); softmax(−(Wx + b))], W and b trained with the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .feature_maps import FeatureMap
from .registry import feature_maps


@feature_maps.register("taylor")
class Taylor(FeatureMap):
    """Based's Taylor map of exp (Arora et al. 2024), F = 1 + K + K².

    With d = K, φ(x) = [1, x/d^{1/4}, vec(x ⊗ x)/(√2·d^{1/2})], so that

        φ(q)·φ(k) = 1 + s + s²/2,   s = q·k/√d,

    the expansion of exp(s) to second order. ``taylor`` and ``taylor-2`` name the same map; no other order is
    offered: order 1 gives 1 + s, which is negative for s < −1, so the attention normaliser Σ_t φ(k_t)·φ(q) can
    pass through 0; order 3 would cost K³ features.

    ``non_negative = False``: the features x/d^{1/4} are signed (the flag is about features, and the contract
    checks it so). What the flag guards, a denominator near 0, does not happen for the attention normaliser:
    1 + s + s²/2 = ((1 + s)² + 1)/2 ≥ ½ for every pair, so Σ_t φ(k_t)·φ(q) ≥ L/2. ``positive_kernel = True``
    says that, and ``parse_spec`` then accepts the sum rule's default (``taylor-2/sum`` is attention-normalised,
    as Based reads). Sum normalisation φ/Σφ stays refused by default (``taylor-2/delta`` needs a named
    normalisation, e.g. ``/l2``): Σφ = 1 + u + u²/√2 with u = Σ_i x_i/d^{1/4} is ≥ 1 − 1/(2√2) > 0, but the
    normalised φ is unbounded (‖φ‖² = 1 + r + r²/2 with r = ‖x‖²/√d, for Σφ = 1 when Σ_i x_i = 0), and the
    delta rule's update diverges once β‖φ‖² > 2.

    ``kernel`` gives the scores 1 + s + s²/2 from one dot product per position (K multiply-adds instead of
    F = 1 + K + K²); the sum rule without key normalisation reads through it.
    """

    non_negative = False
    #: φ(q)·φ(k) ≥ ½ for all inputs: the attention normaliser's denominator is bounded away from 0.
    positive_kernel = True

    def __init__(self, n: int = 2):
        super().__init__()
        if n != 2:
            raise ValueError(f"taylor: only the second-order map is implemented (taylor or taylor-2), got taylor-{n}:"
                             " order 1 gives the kernel 1 + s, negative for s < -1, and order 3 K³ features")
        self.n = n

    def dim(self, d_key: int) -> int:
        return 1 + d_key + d_key * d_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> φ(x) (..., 1 + K + K²)."""
        K = x.shape[-1]
        x1 = x * K ** -0.25  # x/d^{1/4}: x1·y1 = s
        outer = (x1[..., :, None] * (x1 * 2 ** -0.5)[..., None, :]).flatten(-2)  # (..., K²): (x1·y1)²/2 summed
        return torch.cat([torch.ones_like(x[..., :1]), x1, outer], dim=-1)

    def kernel(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """φ(k_t)·φ(q) = 1 + s + s²/2 with s = k_t·q/√K, for keys (B, L, K) and queries (B, Q, K) -> (B, L, Q)
        ((B, L, 1) for the memory's one query per sequence)."""
        s = torch.matmul(keys, queries.transpose(-1, -2)).mul_(1.0 / math.sqrt(keys.shape[-1]))  # (B, L, Q)
        return torch.addcmul(1.0 + s, s, s, value=0.5)


@feature_maps.register("hedgehog")
class Hedgehog(FeatureMap):
    """Hedgehog's learned map (Zhang et al. 2024), F = 2K:

        φ(x) = [softmax(z); softmax(−z)],   z = Wx + b,   W ∈ R^{K×K}, b ∈ R^K,

    each softmax over the K features (so each half sums to 1 and Σφ = 2), W and b trained with the model. The
    pair of signs lets φ(q)·φ(k) grow with both agreeing large positive and agreeing large negative
    projections, as exp(q·k) does; softmax keeps the features positive and bounded.

    Initialisation, as Hedgehog's: W = I, b = 0 (at the start φ is the softmax of x and of −x; no random draw,
    so every seed starts from the same map). The parameters are sized by K at construction, so the optimizer
    sees them from the first step: ``memory("hedgehog/...", d_key=K)`` passes K, and so must a direct
    ``feature_map("hedgehog", d_key=K)``. A map built for one K refuses keys of another.

    Unlike the paper, the map is trained here with the task's loss only, not distilled from softmax attention
    weights first (the paper's attention-distillation step).
    """

    non_negative = True

    def __init__(self, d_key: int | None = None):
        super().__init__()
        if d_key is None:
            raise ValueError("hedgehog: the map learns a K x K matrix and needs K at construction: build it with "
                             "memory('hedgehog/<rule>', d_key=K) or feature_map('hedgehog', d_key=K)")
        if isinstance(d_key, bool) or not isinstance(d_key, int) or d_key < 1:
            raise ValueError(f"hedgehog: d_key must be a positive int, got {d_key!r}")
        self.d_key = d_key
        self.weight = nn.Parameter(torch.eye(d_key))  # W: z = x Wᵀ + b
        self.bias = nn.Parameter(torch.zeros(d_key))

    def _check(self, d_key: int) -> None:
        if d_key != self.d_key:
            raise ValueError(f"hedgehog: built for K = {self.d_key} (W is {self.d_key} x {self.d_key}), used with "
                             f"K = {d_key}; build one per key width, memory(spec, d_key={d_key})")

    def dim(self, d_key: int) -> int:
        self._check(d_key)
        return 2 * d_key

    def begin_call(self, d_key: int, device=None, dtype=None) -> None:
        self._check(d_key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> φ(x) (..., 2K). Parameters of another dtype are cast to x's (a float64 check of a
        float32 map); the gradient still reaches them."""
        self._check(x.shape[-1])
        z = torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))  # (..., K)
        return torch.stack([z, -z], dim=-2).softmax(-1).flatten(-2)  # (..., 2, K) -> [softmax(z); softmax(-z)]
