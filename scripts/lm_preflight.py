"""A few training steps of the token-stream language model with each shipped MQAR memory on one device: a quick
check, before a sweep, that every code path runs there (``PYTHONPATH=. python scripts/lm_preflight.py cuda``)."""

import sys
import time

from retrieval_bench.config import load
from retrieval_bench.train import train_run

device = sys.argv[1] if len(sys.argv) > 1 else "auto"
sets = ("train.max_steps=20", "train.eval_every=10", "task.points=[{seq_len=64, num_kv_pairs=8}]",
        "model.d_model=[32]", "train.lr=[3e-3]", "task.eval_seq_len=128", f'train.device="{device}"')
for cfg in load("mqar", sets).expand():
    t0 = time.perf_counter()
    row = train_run(cfg)["row"]
    print(f"{cfg.model.memory:14s} {row['status']:8s} acc {row['final_acc']} state {row['state_size']} "
          f"{row['device']} {time.perf_counter() - t0:.1f} s", flush=True)
