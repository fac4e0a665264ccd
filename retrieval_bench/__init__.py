"""retrieval-bench: associative-retrieval benchmarks for attention and fast-weight memories.

The public API::

    import retrieval_bench as rb
    mem = rb.memory("dpfp-3/delta", d_key=64)    # torch.nn.Module: (B,L,K),(B,L,V),(B,L),(B,Q,K) -> (B,Q,V)
    fm = rb.feature_map("dpfp-2"); fm.dim(64)     # -> 256
    task = rb.task("overwrite", num_keys=20)      # task.sample(batch_size, generator), task.eval_set(generator)
    rb.names("memories")                          # also "feature_maps", "update_rules", "normalisations", "tasks"
"""

from __future__ import annotations

from . import feature_maps as _feature_maps  # noqa: F401  (registers built-ins)
from ._version import __version__
from .feature_maps import FeatureMap, feature_map
from .lm import CausalLM, lm
from .memories import FastWeightMemory, Memory, SoftmaxMemory, memory, parse_spec
from .memories.rules import UpdateRule, update_rule
from .model import RetrievalModel, retrieval_loss
from .registry import REGISTRIES, RegistryError
from .tasks import EvalSet, Sample, Task, task


def names(kind: str) -> list[str]:
    """Registered names of one kind: "memories", "feature_maps", "update_rules", "normalisations", "tasks"."""
    if kind not in REGISTRIES:
        raise RegistryError(f"unknown registry {kind!r}; known: {', '.join(REGISTRIES)}")
    return REGISTRIES[kind].names()


__all__ = [
    "EvalSet", "FastWeightMemory", "FeatureMap", "Memory", "RegistryError", "RetrievalModel", "Sample",
    "SoftmaxMemory", "Task", "UpdateRule", "feature_map", "memory", "names", "parse_spec", "retrieval_loss",
    "task", "update_rule", "__version__",
]
__all__ += ["CausalLM", "lm"]
