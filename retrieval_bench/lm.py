"""A causal language model around any memory: the model family of the token-stream tasks (issue 18, DESIGN §9).

tokens (B, T) -> logits (B, T, vocab_size)::

    x = embed(tokens)
    for each of n_layers blocks:   x = x + mixer(norm(x));   x = x + mlp(norm(x))
    logits = head(norm(x))

The mixer: an optional short causal depthwise convolution (``conv`` = kernel size, 0 = off), then queries, keys,
values (n_heads heads of d_model / n_heads) and one sigmoid gate per name the memory declares (a scalar per head
per step, as the retrieval model makes β, or F per head per step for a gate of width F, ``Memory.gate_dim``), heads
folded into the batch, the memory's all-positions causal form
(``Memory.causal``), an output projection. No positional encoding: the memories and the convolution see order.

Build one with ``lm(memory_spec, vocab_size=..., ..., seed=...)``, which initialises from the seed without
touching the caller's global RNG.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .memories import Memory, memory
from .memories.causal import gate_width

IGNORE_INDEX = -100  # targets at positions that are not queries (PyTorch's cross-entropy default)

# Seed streams of a model's initialisation (as train.py's): the module weights, and each layer's feature map.
_INIT, _PHI = 0, 3


@dataclass
class MixerInputs:
    """What one layer's memory reads, heads folded into the batch (row b·H + h is sequence b, head h).

    keys, queries (B·H, T, K); values (B·H, T, V); betas (B·H, T) or None; gates {name: (B·H, T), or
    (B·H, T, F) for a gate of width F}, the other gates. ``memory.causal(keys, values, queries, betas, **gates)``
    is the layer's read, and the memory's ``trace`` can be called on them for per-step diagnostics.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    betas: torch.Tensor | None
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    n_heads: int = 1


class CausalConv(nn.Module):
    """Depthwise causal convolution over time: y_t = Σ_{i<kernel} w_i ⊙ x_{t-i} (zeros before the start).
    x (B, T, D) -> (B, T, D)."""

    def __init__(self, d: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(d, d, kernel, groups=d, padding=kernel - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        # (B, T, D) -> (B, D, T); padding on both sides, so keep the first T outputs: the causal ones
        return self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)


class Mixer(nn.Module):
    """The sequence mixer of one block: [conv] -> q, k, v, gates per head -> memory.causal -> output projection."""

    def __init__(self, mem: Memory, d_model: int, n_heads: int, conv: int):
        super().__init__()
        self.memory = mem
        self.n_heads = n_heads
        self.conv = CausalConv(d_model, conv) if conv else None
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.gate_names = tuple(mem.gates)
        #: each gate's width per head: 1, or F for a gate of one value per feature (``Memory.gate_dim``)
        self.gate_widths = {g: gate_width(mem, g, d_model // n_heads) for g in self.gate_names}
        # one projection for every gate: gate i's n_heads·width outputs side by side, head-major within the gate
        total = sum(self.gate_widths.values()) * n_heads
        self.gate = nn.Linear(d_model, total) if self.gate_names else None
        unknown = sorted(set(mem.gate_bias) - set(self.gate_names))
        if unknown:
            raise ValueError(f"gate_bias names {unknown}, which are not gates of the memory "
                             f"(its gates: {list(self.gate_names)})")
        for name, block in self._gate_blocks():  # after the default init, so no random draw moves
            if name in mem.gate_bias:
                nn.init.constant_(self.gate.bias[block], float(mem.gate_bias[name]))
        self.out = nn.Linear(d_model, d_model)

    def _gate_blocks(self) -> list[tuple[str, slice]]:
        """Each gate's outputs of the gate projection: n_heads·width of them, one after another."""
        blocks, at = [], 0
        for name in self.gate_names:
            n = self.gate_widths[name] * self.n_heads
            blocks.append((name, slice(at, at + n)))
            at += n
        return blocks

    def inputs(self, h: torch.Tensor) -> MixerInputs:
        """The memory's inputs for the normalised block input h (B, T, d_model)."""
        if self.conv is not None:
            h = self.conv(h)
        return self.split(self.qkv(h), None if self.gate is None else torch.sigmoid(self.gate(h)))

    def split(self, qkv: torch.Tensor, g: torch.Tensor | None) -> MixerInputs:
        """The memory's inputs from the projections: qkv (B, T, 3·d_model) and the gates after σ, g (B, T,
        H·Σ width) or None; heads folded into the batch. group.py calls it with G runs stacked along B."""
        B, T = qkv.shape[:2]
        H, D = self.n_heads, qkv.shape[-1] // 3

        def fold(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, d) -> (B·H, T, d)
            return x.transpose(1, 2).reshape(B * H, T, -1)

        q, k, v = qkv.reshape(B, T, 3, H, D // H).unbind(2)  # each (B, T, H, D/H)
        gates = {}
        if g is not None:  # (B, T, H·Σ width)
            if all(w == 1 for w in self.gate_widths.values()):
                # scalar gates: the same blocks read as (B, T, G, H), the autograd path (and so the bias
                # gradient's summation order, bit for bit) the stored runs were trained with
                g = g.reshape(B, T, len(self.gate_names), H)
                gates = {name: fold(g[:, :, i, :, None])[..., 0] for i, name in enumerate(self.gate_names)}
            else:
                for name, block in self._gate_blocks():
                    folded = fold(g[..., block].reshape(B, T, H, -1))  # (B·H, T, width)
                    gates[name] = folded[..., 0] if self.gate_widths[name] == 1 else folded
        betas = gates.pop("beta", None)
        return MixerInputs(fold(k), fold(v), fold(q), betas, gates, H)

    def forward(self, h: torch.Tensor, capture: list | None = None) -> torch.Tensor:
        """h (B, T, d_model) -> (B, T, d_model); appends this layer's MixerInputs to ``capture`` if given."""
        B, T, D = h.shape
        x = self.inputs(h)
        if capture is not None:
            capture.append(x)
        y = self.memory.causal(x.keys, x.values, x.queries, x.betas, **x.gates)  # (B·H, T, D/H)
        y = y.reshape(B, self.n_heads, T, -1).transpose(1, 2).reshape(B, T, D)  # heads back beside each other
        return self.out(y)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (no MLP where mlp_ratio = 0)."""

    def __init__(self, mem: Memory, d_model: int, n_heads: int, conv: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = Mixer(mem, d_model, n_heads, conv)
        self.norm2 = nn.LayerNorm(d_model) if mlp_ratio else None
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model)) if mlp_ratio else None

    def forward(self, x: torch.Tensor, capture: list | None = None) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), capture)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


def _positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"lm: {name} must be a positive int, got {v!r}")


class CausalLM(nn.Module):
    """tokens (B, T) int64 in [0, vocab_size) -> logits (B, T, vocab_size); logits at t see tokens ≤ t only.

    Args:
        memory_spec: the sequence mixer, a spec string (``"softmax"``, ``"dpfp-1/sum"``, ``"linear/delta"``)
            built once per layer with K = V = d_model / n_heads, or a Memory (copied per layer).
        vocab_size, d_model, n_layers, n_heads: sizes; d_model must divide into n_heads heads.
        conv: kernel size of the short causal depthwise convolution before each mixer; 0 = none.
        mlp_ratio: hidden width of each block's MLP as a multiple of d_model; 0 = no MLP.
        **memory_kwargs: to ``retrieval_bench.memory`` (``redraw=`` for FAVOR+).
    """

    def __init__(self, memory_spec: str | Memory, vocab_size: int, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 2, conv: int = 0, mlp_ratio: int = 4, **memory_kwargs):
        super().__init__()
        _positive(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
        if d_model % n_heads:
            raise ValueError(f"lm: d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        for name, v in (("conv", conv), ("mlp_ratio", mlp_ratio)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"lm: {name} must be an int >= 0, got {v!r}")
        self.vocab_size, self.d_model, self.n_heads = vocab_size, d_model, n_heads
        self.d_head = d_model // n_heads
        self.memory_spec = memory_spec if isinstance(memory_spec, str) else \
            getattr(memory_spec, "spec_name", type(memory_spec).__name__)

        def build() -> Memory:
            if isinstance(memory_spec, str):
                return memory(memory_spec, d_key=self.d_head, **memory_kwargs)
            return copy.deepcopy(memory_spec)

        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(build(), d_model, n_heads, conv, mlp_ratio) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    @property
    def memories(self) -> list[Memory]:
        """Each layer's memory."""
        return [b.mixer.memory for b in self.blocks]

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point() \
                or tokens.is_complex() or tokens.dtype == torch.bool:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ValueError(f"lm: tokens must be a (B, T) integer tensor, got {got}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"lm: tokens must lie in [0, vocab_size = {self.vocab_size}), got "
                             f"[{tokens.min().item()}, {tokens.max().item()}]")

    def forward(self, tokens: torch.Tensor, capture: list | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size); with ``mask`` (B, T) bool, the logits at those positions
        only, (n, vocab_size) in ``mask.nonzero()`` order (a loss at a few query positions then never makes the
        whole (B, T, vocab) tensor); with ``capture`` (a list), each layer's MixerInputs are appended to it."""
        self._check_tokens(tokens)
        x = self.embed(tokens)  # (B, T, d_model)
        for block in self.blocks:
            x = block(x, capture)
        return self.head(self.norm(x if mask is None else x[mask]))

    @torch.no_grad()
    def mixer_inputs(self, tokens: torch.Tensor) -> list[MixerInputs]:
        """Each layer's memory inputs for a batch (B, T), under no_grad: the raw material of per-layer, per-head
        diagnostics (row b·H + h of each tensor is sequence b, head h)."""
        capture: list[MixerInputs] = []
        self(tokens, capture)
        return capture

    @torch.no_grad()
    def trace(self, tokens: torch.Tensor) -> list[dict[str, torch.Tensor] | None]:
        """Each layer's ``memory.trace`` over the whole sequence, read with the last position's query: per-step
        records (B·H, T[, V]) such as v_bar, state_norm and normaliser; None where the memory offers none."""
        return [mem.trace(x.keys, x.values, x.betas, x.queries[:, -1:], **x.gates)
                for mem, x in zip(self.memories, self.mixer_inputs(tokens), strict=True)]

    def per_layer_state_size(self, seq_len: int) -> list[int]:
        """Floats of recurrent state per layer after ``seq_len`` tokens, measured from each memory (its
        ``state_size`` per head, times the heads; softmax counts its KV cache at ``seq_len``). The short
        convolution's (conv - 1)·d_model floats of context are not counted."""
        return [self.n_heads * mem.state_size(self.d_head, self.d_head, seq_len) for mem in self.memories]

    def state_size(self, seq_len: int) -> int:
        """Floats of recurrent state over all layers and heads after ``seq_len`` tokens."""
        return sum(self.per_layer_state_size(seq_len))


def lm(memory_spec: str | Memory, *, vocab_size: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 2,
       conv: int = 0, mlp_ratio: int = 4, seed: int = 0, **memory_kwargs) -> CausalLM:
    """A ``CausalLM`` initialised from ``seed``, leaving the caller's global RNG as it was (a fork_rng, as
    train.py's ``build_model`` does); each layer's random feature map (FAVOR+) is seeded from it too."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + _INIT)  # nn modules draw their init from the global RNG
        model = CausalLM(memory_spec, vocab_size, d_model, n_layers, n_heads, conv, mlp_ratio, **memory_kwargs)
    for i, mem in enumerate(model.memories):
        phi = getattr(mem, "phi", None)
        if phi is not None:
            phi.seed(seed * 1000 + _PHI + 10 * i)  # streams 3, 13, 23, ...: none meets _INIT
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ``IGNORE_INDEX``. logits (B, T, vocab),
    targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def query_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The fraction of query positions (target ≠ ``IGNORE_INDEX``) whose arg-max is the target."""
    mask = targets != IGNORE_INDEX
    return ((logits.argmax(-1) == targets) & mask).sum().item() / max(int(mask.sum()), 1)
