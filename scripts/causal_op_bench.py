"""The memory's own all-positions op, without the rest of a language-model step: ``causal`` (the fast form)
against ``causal_reference`` (the per-step loop read at every position), forward and backward of
y.square().sum(), from the same inputs, alternating in one process; CPU time, medians.

    PYTHONPATH=. python scripts/causal_op_bench.py --seq-len 256 --seq-len 1024 linear/sum linear/delta

B·H = 128 sequences (B = 64, 2 heads), keys, values and queries of width 64, one thread by default; glibc's
allocator tuned as the sweep's workers tune it (``runtime.tune_malloc``) unless ``--default-malloc``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import retrieval_bench as rb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("memories", nargs="+")
    ap.add_argument("--seq-len", type=int, action="append", default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator as it is")
    args = ap.parse_args()
    if not args.default_malloc:
        rb.runtime.tune_malloc()
    torch.set_num_threads(args.threads)
    for T in args.seq_len or [256]:
        for spec in args.memories:
            mem = rb.memory(spec, d_key=args.width)
            g = torch.Generator().manual_seed(0)
            k, v, q = (torch.randn(args.batch, T, args.width, generator=g).requires_grad_() for _ in range(3))
            beta = torch.rand(args.batch, T, generator=g).requires_grad_()
            forms = {"fast": mem.causal} if args.no_reference else {"fast": mem.causal,
                                                                     "reference": mem.causal_reference}
            times: dict[str, list[float]] = {name: [] for name in forms}
            for i in range(args.repeat + 1):  # the first round warms up
                for name, form in forms.items():
                    t0 = time.process_time()
                    form(k, v, q, beta if "delta" in spec else None).square().sum().backward()
                    if i:
                        times[name].append(time.process_time() - t0)
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            ratio = f", reference / fast {ms['reference'] / ms['fast']:.1f}x" if "reference" in ms else ""
            print(f"{spec} T={T}: " + ", ".join(f"{n} {m:,.0f} ms" for n, m in ms.items()) + ratio, flush=True)


if __name__ == "__main__":
    main()
