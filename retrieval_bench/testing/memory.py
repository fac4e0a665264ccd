"""``check_memory``: the memory contract (DESIGN §3), every check of one memory."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence

import torch

from ..feature_maps import FeatureMap
from ..memories import FastWeightMemory, Memory
from ._base import (
    EVAL_SEQUENCE,
    REQUIRED_GRADS,
    TRACE_PER_STEP,
    Checker,
    Shape,
    call,
    default_shapes,
    finite_number,
    gradients,
    make_inputs,
    shape_id,
)


def check_memory(spec_or_memory: str | Memory, d_key: int = 4, *, shapes: Sequence[Shape] | None = None,
                 atol: float = 1e-10, rtol: float = 1e-10, check_model: bool = True, **memory_kwargs) -> None:
    """Run every contract check on one memory; raise AssertionError naming the memory and the check.

    Checks, for every (B, L, Q, K, V) in ``shapes`` (default ``default_shapes(d_key)``):

    * ``forward``: in float32 the output is (B, Q, V), float32 and finite;
    * ``gradients``: finite gradients reach keys, values and queries, and are finite on betas (where the
      memory declares the ``beta`` gate), every other declared gate and every parameter;
    * ``reference`` (where the memory has a ``reference`` method): in float64 the training form equals the
      reference loop to ``atol``/``rtol`` in outputs and in every gradient;
    * ``trace`` (where ``trace`` returns a dict): ``trace(...)["y"]`` equals the forward output, per-step
      entries the diagnostics read (v_bar, state_norm, ...) are (B, L[, V]), and every per-step entry up to
      step t is the same whatever is written after t (causal);
    * ``state_size``: ``state_size(K, V, L)`` is a positive integer, at least V·F where the memory has a
      fixed-size state of F features (``d_dot``);

    and once:

    * ``gradients``: keys, values, queries, betas, every declared gate and every parameter of a feature map get a
      non-zero gradient in some case;
    * ``gates``: leaving out a declared gate other than β (which defaults to 1) raises a ValueError naming it;
    * ``evaluation`` (with a ``reference``): without autograd and with more queries than values, over
      ``EVAL_SEQUENCE`` = 70 writes (where the delta rule builds W chunk by chunk), forward equals the reference
      in float64, relative to the output's scale;
    * ``independence``: changing one sequence of the batch changes its reads and no other's, and a subset of
      the queries reads what those queries read among all of them;
    * ``no-op write`` (a composed memory without the attention normaliser whose only gate is β, or none): one
      more write with β = 0 (v = 0 for an ungated rule) changes neither forward nor reference;
    * ``model`` (unless ``check_model=False``): a ``RetrievalModel`` around the memory has one gate projection
      per name in ``memory.gates`` and gets finite gradients on every parameter, each gate's included.

    Args:
        spec_or_memory: a spec string (``"dpfp-1/my-rule"``, a registered memory's name), built per key width
            with ``retrieval_bench.memory``; or a Memory instance, used as it is with K = ``d_key``.
        d_key: K of the default shapes (and of the checks made once).
        shapes: (B, L, Q, K, V) cases.
        atol, rtol: tolerance of the float64 comparisons (reference, trace, independence, no-op write).
        check_model: also run the memory inside the model.
        **memory_kwargs: passed to ``retrieval_bench.memory`` (e.g. ``redraw="fixed"`` for FAVOR+).
    """
    ck = Checker(spec_or_memory, d_key, memory_kwargs)
    shapes = list(shapes) if shapes is not None else default_shapes(d_key)
    if ck.instance is not None:  # a built instance has one key width
        shapes = [(B, L, Q, d_key, V) for B, L, Q, _, V in shapes]
    built = ck.build(d_key)
    gates = tuple(getattr(built, "gates", ()))
    if not all(isinstance(gname, str) and gname.isidentifier() for gname in gates):
        raise ck.fail("gates", f"memory.gates must be a tuple of identifier strings, got {gates!r}")
    bias = dict(getattr(built, "gate_bias", {}))
    if not set(bias) <= set(gates) or not all(finite_number(b) for b in bias.values()):
        raise ck.fail("gate_bias", f"memory.gate_bias must map some of its gates {gates!r} to finite numbers, "
                                   f"got {bias!r}")
    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(1234)
        for shape in shapes:
            _named(ck, f"[{shape_id(shape)}]", _check_shape, ck, shape, g, atol, rtol)
        _check_reached(ck, built)
        _named(ck, "gates", _check_missing_gates, ck, built, d_key, g)
        _named(ck, "evaluation", _check_evaluation, ck, built, d_key, g, atol, rtol)
        _named(ck, "independence", _check_independence, ck, built, d_key, g, atol, rtol)
        _named(ck, "no-op write", _check_no_op_write, ck, built, d_key, g, atol, rtol)
        if check_model:
            _check_model(ck, d_key, g)


def _named(ck: Checker, what: str, fn, *args) -> None:
    """Run one check; an unexpected exception (a backward that fails) still names the memory and the check."""
    try:
        fn(*args)
    except AssertionError:
        raise
    except Exception as e:
        raise ck.fail(what, f"raised {type(e).__name__}: {e}") from e


def _check_shape(ck: Checker, shape: Shape, g: torch.Generator, atol: float, rtol: float) -> None:
    B, L, Q, K, V = shape
    sid = shape_id(shape)
    mem = ck.build(K)
    was_training = mem.training
    mem.train()
    try:
        # float32: shapes and finite gradients, as training runs it
        args, gates, leaves = make_inputs(mem, shape, torch.float32, g)
        try:
            y = call(mem, mem, *args, **gates)
        except Exception as e:
            raise ck.fail(f"forward [{sid}]", f"raised {type(e).__name__}: {e}") from e
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (B, Q, V):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ck.fail(f"forward [{sid}]", f"expected output shape (B, Q, V) = {(B, Q, V)}, got {got}")
        if y.dtype != torch.float32:
            raise ck.fail(f"forward [{sid}]", f"float32 inputs gave a {y.dtype} output")
        ck.finite(f"forward [{sid}]", y, "the output")
        params = {n: p for n, p in mem.named_parameters() if p.requires_grad}
        for what, grad in gradients(y, leaves, params, torch.randn(y.shape, generator=g)).items():
            ck.finite(f"gradients [{sid}]", grad, f"d/d {what}", required=what in REQUIRED_GRADS)
            if grad is not None and bool(grad.abs().sum() > 0):
                ck.reached.add(what)

        # float64: the training form against the reference loop and the trace
        mem64 = copy.deepcopy(mem).to(torch.float64)
        args, gates, leaves = make_inputs(mem64, shape, torch.float64, g)
        params = {n: p for n, p in mem64.named_parameters() if p.requires_grad}
        y = call(mem64, mem64, *args, **gates)
        cot = torch.randn(y.shape, generator=g, dtype=torch.float64)
        reference = getattr(mem64, "reference", None)
        if callable(reference):
            check = f"reference [{sid}, float64]"
            try:
                y_ref = call(mem64, reference, *args, **gates)
            except Exception as e:
                raise ck.fail(check, f"reference raised {type(e).__name__}: {e}") from e
            ck.close(check, y, y_ref, "outputs of forward and reference", atol, rtol)
            grads = gradients(y, leaves, params, cot)
            grads_ref = gradients(y_ref, leaves, params, cot)
            wrt = {**leaves, **{f"parameter {n!r}": p for n, p in params.items()}}
            for what, grad in grads.items():
                ref = grads_ref[what]
                if grad is None and ref is None:
                    continue
                zero = torch.zeros_like(wrt[what])  # an input that does not enter a form has zero gradient
                ck.close(check, zero if grad is None else grad, zero if ref is None else ref,
                         f"d/d {what} of forward and reference", atol, rtol)
        _check_trace(ck, mem64, args, gates, y.detach(), shape, g, atol, rtol)
    finally:
        mem.train(was_training)

    try:
        size = mem.state_size(K, V, L)
    except NotImplementedError:
        raise ck.fail(f"state_size [{sid}]", "the memory does not implement state_size()") from None
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size <= 0:
        raise ck.fail(f"state_size [{sid}]", f"state_size({K}, {V}, {L}) must be a positive int, got {size!r}")
    d_dot = getattr(mem, "d_dot", lambda _: None)(K)
    if d_dot is not None and size < V * d_dot:
        raise ck.fail(f"state_size [{sid}]", f"state_size({K}, {V}, {L}) = {size} is less than one V x F "
                                             f"matrix ({V} x d_dot = {d_dot})")


def _check_trace(ck: Checker, mem: Memory, args, gates, y: torch.Tensor, shape: Shape, g: torch.Generator,
                 atol: float, rtol: float) -> None:
    trace_fn = getattr(mem, "trace", None)
    if not callable(trace_fn):
        return
    B, L, Q, K, V = shape
    check = f"trace [{shape_id(shape)}, float64]"
    keys, values, betas, queries = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    gates = {n: t.detach() for n, t in gates.items()}
    try:
        rec = call(mem, trace_fn, keys, values, betas, queries, **gates)
    except NotImplementedError:
        return
    except Exception as e:
        raise ck.fail(check, f"trace raised {type(e).__name__}: {e}") from e
    if rec is None:
        return
    if not isinstance(rec, dict) or "y" not in rec:
        raise ck.fail(check, "a trace must be a dict holding 'y', the forward output")
    ck.close(check, rec["y"], y, "trace['y'] and the forward output", atol, rtol)
    for name, tail in TRACE_PER_STEP.items():
        if name in rec:
            want = (B, L, V) if tail else (B, L)
            if tuple(rec[name].shape) != want:
                raise ck.fail(check, f"trace[{name!r}] must be {want}, got {tuple(rec[name].shape)}")
    if L < 2 or Q == L:  # with Q = L a per-query entry (B, Q, ...) could not be told from a per-step one
        return
    # causal: new writes from step t on leave every per-step entry before t as it was
    t = L // 2

    def rewritten(x: torch.Tensor | None, gate: bool = False) -> torch.Tensor | None:
        if x is None:
            return None
        fresh = torch.rand(x[:, t:].shape, generator=g, dtype=x.dtype) if gate else \
            torch.randn(x[:, t:].shape, generator=g, dtype=x.dtype)  # gates in (0, 1), vectors unbounded
        return torch.cat([x[:, :t], fresh], 1)

    rec2 = call(mem, trace_fn, rewritten(keys), rewritten(values), rewritten(betas, True), queries,
                **{n: rewritten(x, True) for n, x in gates.items()})
    for name, r in rec.items():
        if isinstance(r, torch.Tensor) and r.dim() >= 2 and tuple(r.shape[:2]) == (B, L):
            ck.close(check, rec2[name][:, :t], r[:, :t],
                     f"trace[{name!r}] up to step {t} before and after rewriting the later steps (not causal)",
                     atol, rtol)


def _check_reached(ck: Checker, mem: Memory) -> None:
    """Every input that the memory reads got a non-zero gradient in at least one case."""
    gates = tuple(getattr(mem, "gates", ()))
    expected = list(REQUIRED_GRADS) + (["betas"] if "beta" in gates else [])
    expected += [f"gate {name!r}" for name in gates if name != "beta"]
    # a learned feature map's parameters (hedgehog's W, b) enter every read through φ(q)
    learned = {f"{prefix}.{n}" if prefix else n for prefix, m in mem.named_modules() if isinstance(m, FeatureMap)
               for n, p in m.named_parameters() if p.requires_grad}
    expected += [f"parameter {n!r}" for n in sorted(learned)]
    missing = [what for what in expected if what not in ck.reached]
    if missing:
        raise ck.fail("gradients", f"the gradient on {', '.join(missing)} is zero in every case: the input does "
                                   "not reach the output")


def _check_missing_gates(ck: Checker, mem: Memory, d_key: int, g: torch.Generator) -> None:
    """Leaving out a declared gate other than β is a clear error naming it, not a silent default."""
    args, gates, _ = make_inputs(mem, (2, 4, 2, d_key, 3), torch.float32, g, requires_grad=False)
    for name in gates:
        others = {n: x for n, x in gates.items() if n != name}
        try:
            call(mem, mem, *args, **others)
        except ValueError as e:
            if name not in str(e):
                raise ck.fail("gates", f"leaving out the gate {name!r} raised a ValueError that does not name "
                                       f"it: {e}") from None
            continue
        raise ck.fail("gates", f"leaving out the declared gate {name!r} must raise a ValueError naming it; the "
                               "call went through")


def _check_evaluation(ck: Checker, mem: Memory, d_key: int, g: torch.Generator, atol: float,
                      rtol: float) -> None:
    """Without autograd and with Q > V a memory may take another exact path (the delta rule builds W chunk by
    chunk); it must still equal the reference. Small β keep the unnormalised and signed-feature memories from
    growing large over 70 steps; the tolerance is relative to the output's scale, since a few still do."""
    if not callable(getattr(mem, "reference", None)):
        return
    mem64 = copy.deepcopy(mem).to(torch.float64)
    V = 3
    (keys, values, betas, queries), gates, _ = make_inputs(mem64, (2, EVAL_SEQUENCE, V + 4, d_key, V),
                                                           torch.float64, g, requires_grad=False)
    betas = None if betas is None else 0.2 * betas
    with torch.no_grad():
        y = call(mem64, mem64, keys, values, betas, queries, **gates)
        y_ref = call(mem64, mem64.reference, keys, values, betas, queries, **gates)
    scale = max(1.0, y_ref.abs().max().item())
    ck.close(f"evaluation [L{EVAL_SEQUENCE}, Q{V + 4} > V{V}, no autograd, float64]", y, y_ref,
             "outputs of forward and reference", max(atol, 1e-9) * scale, max(rtol, 1e-9))


def _check_independence(ck: Checker, mem: Memory, d_key: int, g: torch.Generator, atol: float,
                        rtol: float) -> None:
    """Sequences of a batch are read independently, and so are the queries of a sequence."""
    mem64 = copy.deepcopy(mem).to(torch.float64)
    B, L, Q, V = 2, 6, 5, 3
    (keys, values, betas, queries), gates, _ = make_inputs(mem64, (B, L, Q, d_key, V), torch.float64, g,
                                                           requires_grad=False)
    with torch.no_grad():
        y = call(mem64, mem64, keys, values, betas, queries, **gates)
        keys2, values2 = keys.clone(), values.clone()
        keys2[1] = torch.randn(L, d_key, generator=g, dtype=keys.dtype)
        values2[1] = torch.randn(L, V, generator=g, dtype=keys.dtype)
        y2 = call(mem64, mem64, keys2, values2, betas, queries, **gates)
        ck.close("independence", y2[0], y[0], "reads of sequence 0 before and after changing sequence 1", atol,
                 rtol)
        if torch.allclose(y2[1], y[1]):
            raise ck.fail("independence", "changing the keys and values of sequence 1 left its reads unchanged")
        sub = call(mem64, mem64, keys, values, betas, queries[:, 1:3], **gates)
        ck.close("independence", sub, y[:, 1:3], "reads of queries 1-2 alone and among all 5", atol, rtol)


def _check_no_op_write(ck: Checker, mem: Memory, d_key: int, g: torch.Generator, atol: float,
                       rtol: float) -> None:
    """Where some write is known to leave the state as it was: β = 0 for a rule gated by β alone, v = 0 for an
    ungated one. Not so with the attention normaliser, which re-weights every earlier write, nor for a rule
    with other gates (a decay α has no generic no-op value)."""
    if not (isinstance(mem, FastWeightMemory) and not mem.attn and set(mem.gates) <= {"beta"}):
        return
    mem64 = copy.deepcopy(mem).to(torch.float64)
    B, L, Q, V = 2, 6, 5, 3
    (keys, values, betas, queries), _, _ = make_inputs(mem64, (B, L, Q, d_key, V), torch.float64, g,
                                                       requires_grad=False)
    betas = torch.sigmoid(torch.randn(B, L, generator=g, dtype=keys.dtype)) if betas is None else betas
    new_v = torch.randn(B, 1, V, generator=g, dtype=keys.dtype)
    if "beta" not in mem.gates:
        new_v.zero_()
    longer = (torch.cat([keys, torch.randn(B, 1, d_key, generator=g, dtype=keys.dtype)], 1),
              torch.cat([values, new_v], 1), torch.cat([betas, betas.new_zeros(B, 1)], 1), queries)
    with torch.no_grad():
        for form in ("forward", "reference"):
            fn = getattr(mem64, form)
            ck.close("no-op write", call(mem64, fn, *longer), call(mem64, fn, keys, values, betas, queries),
                     f"{form} reads with and without a last write of β = 0 (v = 0 without β)", atol, rtol)


def _check_model(ck: Checker, d_key: int, g: torch.Generator) -> None:
    """One σ(W_g x) per declared gate, and one finite training step: every parameter, each gate's projection
    included, gets a finite gradient. (A missing projection for β would pass silently otherwise: the memory
    reads β = 1 where the model passes none.)"""
    from ..model import RetrievalModel, retrieval_loss

    S, B, L = 5, 3, 6
    mem = copy.deepcopy(ck.build(d_key)).to(torch.float32)
    try:
        model = RetrievalModel(S, mem, d_key=d_key)
        keys = torch.randint(0, S, (B, L), generator=g)
        values = torch.randint(0, S, (B, L), generator=g)
        queries = torch.randint(0, S, (B, 2), generator=g)
        y = call(mem, model, keys, values, queries)
    except Exception as e:
        raise ck.fail("model", f"RetrievalModel forward raised {type(e).__name__}: {e}") from e
    if tuple(y.shape) != (B, 2, S):
        raise ck.fail("model", f"expected (B, Q, V) = {(B, 2, S)}, got {tuple(y.shape)}")
    declared = tuple(getattr(mem, "gates", ()))
    if tuple(model.W_g) != declared:
        raise ck.fail("model", f"the model has gate projections {tuple(model.W_g)} for the declared gates "
                               f"{declared}")
    retrieval_loss(y, queries).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            what = f"model parameter {name!r}" + (" (a declared gate)" if name.startswith("W_g.") else "")
            ck.finite("model", p.grad, what)
