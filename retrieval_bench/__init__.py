"""retrieval-bench: associative-retrieval benchmarks for attention and fast-weight memories.

The public API::

    import retrieval_bench as rb
    mem = rb.memory("dpfp-3/delta", d_key=64)    # torch.nn.Module: (B,L,K),(B,L,V),(B,L),(B,Q,K) -> (B,Q,V)
    fm = rb.feature_map("dpfp-2"); fm.dim(64)     # -> 256
    task = rb.task("overwrite", num_keys=20)      # task.sample(batch_size, generator), task.eval_set(generator)
    model = rb.lm("dpfp-1/delta", vocab_size=256) # a causal language model: tokens (B, T) -> logits (B, T, vocab)
    rb.names("memories")                          # also "feature_maps", "update_rules", "normalisations", "tasks"

Names are imported on first use (PEP 562), so ``import retrieval_bench`` and the torch-free parts (the report,
the store, ``retrieval_bench.spec``) start without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from ._version import __version__

# public name -> the module that defines it
_LAZY = {
    "FeatureMap": "feature_maps", "feature_map": "feature_maps",
    "CausalLM": "lm", "lm": "lm",
    "FastWeightMemory": "memories", "Memory": "memories", "SoftmaxMemory": "memories", "memory": "memories",
    "parse_spec": "memories",
    "UpdateRule": "memories.rules", "update_rule": "memories.rules",
    "RetrievalModel": "model", "retrieval_loss": "model",
    "REGISTRIES": "registry", "RegistryError": "registry",
    "EvalSet": "tasks", "Sample": "tasks", "Task": "tasks", "task": "tasks",
}


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``retrieval_bench.lm`` would bind it as the package's
    attribute ``lm`` and hide the function ``rb.lm``; the function stays (the submodule is in ``sys.modules``, so
    ``from retrieval_bench.lm import ...`` works as ever)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


#: public functions named like the submodule that defines them
_SHADOWED = {"lm"}
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and name not in _SHADOWED and importlib.util.find_spec(f".{name}", __name__):
            return importlib.import_module(f".{name}", __name__)  # a submodule: rb.memories, rb.registry, ...
        raise AttributeError(f"module 'retrieval_bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def names(kind: str) -> list[str]:
    """Registered names of one kind: "memories", "feature_maps", "update_rules", "normalisations", "tasks"."""
    from .registry import REGISTRIES, RegistryError

    if kind not in REGISTRIES:
        raise RegistryError(f"unknown registry {kind!r}; known: {', '.join(REGISTRIES)}")
    return REGISTRIES[kind].names()


__all__ = ["EvalSet", "FastWeightMemory", "FeatureMap", "Memory", "RegistryError", "RetrievalModel", "Sample",
           "SoftmaxMemory", "Task", "UpdateRule", "feature_map", "memory", "names", "parse_spec",
           "retrieval_loss", "task", "update_rule", "__version__", "CausalLM", "lm"]
