"""Where runs execute: in this process, on a local process pool (default), or on Ray (``ray_executor.py``).

Every executor runs the same job function, ``execute``, and hands results back to the driver, which alone
writes the store. ``Executor.run`` yields results as runs finish and reports live progress through a callback.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


def setup_worker(threads: int) -> None:
    """Per-worker settings: cap torch's threads so workers do not oversubscribe the cores, and exit when the
    driver is gone (a SIGKILLed driver cannot tell its pool to stop, and an orphan would hold a core)."""
    import threading

    import torch

    torch.set_num_threads(max(1, threads))
    parent = os.getppid()

    def watch_parent():
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch_parent, daemon=True, name="watch-driver").start()
    try:
        from .bench import tune_malloc
    except ImportError:  # the bench module is optional here
        return
    tune_malloc()


def execute(cfg_dict: dict[str, Any], progress_queue=None) -> dict[str, Any]:
    """The job function: train one run from its config dict; never raises (an error becomes ``failed``)."""
    from .config import RunConfig
    from .train import failed_result, train_run

    cfg = RunConfig.from_dict(cfg_dict)
    t0 = time.perf_counter()
    try:
        progress = None
        if progress_queue is not None:
            def progress(event):
                progress_queue.put({**event, "pid": os.getpid()})
        return train_run(cfg, progress=progress)
    except Exception:  # a run's error must not end the sweep; it is stored with its traceback
        return failed_result(cfg, traceback.format_exc(), time.perf_counter() - t0)


class Executor:
    """Interface: ``run(configs, on_start, on_progress)`` yields result dicts as runs finish."""

    name = "base"

    def run(self, configs: Iterable[dict[str, Any]], on_start: Progress | None = None,
            on_progress: Progress | None = None) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class InlineExecutor(Executor):
    """Runs one after another in this process (``--workers 1``): simplest to debug and to interrupt."""

    name = "inline"

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def run(self, configs, on_start=None, on_progress=None):
        import torch

        from .bench import tune_malloc

        # as the pool's workers do: runs in this process reuse their large tensors' pages (a process-wide
        # setting that stays: the process keeps its high-water mark of memory)
        tune_malloc()
        old = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        sink = _CallbackSink(on_progress) if on_progress else None
        try:
            for cfg in configs:
                if on_start:
                    on_start({"run_id": _rid(cfg)})
                yield execute(cfg, sink)
        finally:
            torch.set_num_threads(old)


class _CallbackSink:
    """Queue-like ``put`` that calls the live view directly, for runs in this process."""

    def __init__(self, callback: Progress):
        self.put = callback


def _rid(cfg: dict[str, Any]) -> str:
    from .config import RunConfig

    return RunConfig.from_dict(cfg).run_id


class LocalExecutor(Executor):
    """A pool of worker processes, each single-threaded by default (more throughput than threads here)."""

    name = "local"

    def __init__(self, workers: int, threads_per_worker: int = 1, max_retries: int = 1):
        self.workers, self.threads, self.max_retries = workers, threads_per_worker, max_retries
        # spawn, not fork: a forked child inherits the parent's torch thread pools, which can deadlock.
        self._ctx = mp.get_context("spawn")
        self._manager = None

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._ctx, initializer=setup_worker,
                                   initargs=(self.threads,))

    def run(self, configs, on_start=None, on_progress=None):
        self._manager = self._ctx.Manager()
        pq = self._manager.Queue()
        todo = list(configs)
        retries: dict[str, int] = {}
        pool = self._pool()
        pending: dict[Future, dict[str, Any]] = {}
        try:
            while todo or pending:
                while todo and len(pending) < self.workers:
                    cfg = todo.pop(0)
                    pending[pool.submit(execute, cfg, pq)] = cfg
                    if on_start:
                        on_start({"run_id": _rid(cfg)})
                done, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(pq, on_progress)
                broken = False
                for fut in done:
                    cfg = pending.pop(fut)
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        broken = True
                        rid = _rid(cfg)
                        retries[rid] = retries.get(rid, 0) + 1
                        if retries[rid] > self.max_retries:
                            from .config import RunConfig
                            from .train import failed_result

                            yield failed_result(RunConfig.from_dict(cfg), "worker process died (killed or OOM)")
                        else:
                            todo.insert(0, cfg)
                if broken:  # a dead worker poisons the whole pool: start a new one for the rest
                    log.warning("a worker process died; restarting the pool")
                    for cfg in pending.values():
                        todo.insert(0, cfg)
                    pending.clear()
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = self._pool()
            _drain(pq, on_progress)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            _terminate(pool)
            self._manager.shutdown()


def _drain(pq, on_progress) -> None:
    while True:
        try:
            event = pq.get_nowait()
        except (queue_mod.Empty, OSError, EOFError):
            return
        if on_progress:
            on_progress(event)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop workers still training (Ctrl-C): their runs are lost anyway and redone on the next call."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        if p.is_alive():
            p.terminate()


def make_executor(name: str = "local", workers: int | None = None, threads: int | None = None,
                  **kwargs) -> Executor:
    """``local`` (a process pool, or inline for one worker) or ``ray``."""
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(threads_per_run=threads or 1, **kwargs)
    if name != "local":
        raise ValueError(f"unknown executor {name!r} (known: local, ray)")
    workers = workers or default_workers()
    if workers == 1:
        return InlineExecutor(threads=threads or 1)
    return LocalExecutor(workers, threads_per_worker=threads or 1)


def default_workers() -> int:
    """One single-threaded worker per core: on 2 cores, 1.3-1.45x the throughput of one 2-thread process."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
