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


_progress_queue = None  # in a pool worker: the queue its runs report progress on (set by ``setup_worker``)


def setup_worker(threads: int, progress_queue=None) -> None:
    """Per-worker settings: cap torch's threads so workers do not oversubscribe the cores, and exit when the
    driver is gone (a SIGKILLed driver cannot tell its pool to stop, and an orphan would hold a core).

    ``progress_queue`` is a ``multiprocessing`` queue the worker inherits at its start, so no helper process
    (a ``Manager``) has to serve it: such a helper would outlive a SIGKILLed driver. The worker never waits
    on it at exit (``cancel_join_thread``): progress is best effort, a finished run travels with its future.
    """
    import threading

    import torch

    global _progress_queue
    if progress_queue is not None:
        progress_queue.cancel_join_thread()
    _progress_queue = progress_queue
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


def _execute_in_worker(job: Callable[..., dict[str, Any]], cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return job(cfg_dict, _progress_queue)


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
    """A pool of worker processes, each single-threaded by default (more throughput than threads here).

    A worker that dies (killed, out of memory) breaks the whole pool and every run in flight with it, and the
    pool cannot say whose worker it was. So the runs in flight then are rerun one at a time on a fresh pool:
    a run that breaks its pool alone is the cause, and is retried ``max_retries`` times before it is stored
    ``failed``; the others finish and the pool widens again. ``job`` is the job function (``execute``; tests
    inject others, which must be importable by the workers).
    """

    name = "local"

    def __init__(self, workers: int, threads_per_worker: int = 1, max_retries: int = 1,
                 job: Callable[..., dict[str, Any]] = execute):
        self.workers, self.threads, self.max_retries, self.job = workers, threads_per_worker, max_retries, job
        # spawn, not fork: a forked child inherits the parent's torch thread pools, which can deadlock.
        self._ctx = mp.get_context("spawn")

    def _pool(self):
        """A fresh pool with a fresh progress queue: a worker killed while writing may leave a queue's lock
        held, so a restarted pool never shares its predecessor's queue."""
        pq = self._ctx.Queue()
        pool = ProcessPoolExecutor(self.workers, mp_context=self._ctx, initializer=setup_worker,
                                   initargs=(self.threads, pq))
        return pool, pq

    def run(self, configs, on_start=None, on_progress=None):
        todo = list(configs)
        isolate: list[dict[str, Any]] = []  # runs in flight when a pool broke: rerun one at a time
        retries: dict[str, int] = {}
        pool, pq = self._pool()
        pending: dict[Future, dict[str, Any]] = {}
        try:
            while todo or isolate or pending:
                while (isolate and not pending) or (todo and not isolate and len(pending) < self.workers):
                    cfg = (isolate or todo).pop(0)
                    pending[pool.submit(_execute_in_worker, self.job, cfg)] = cfg
                    if on_start:
                        on_start({"run_id": _rid(cfg)})
                done, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(pq, on_progress)
                lost = []
                for fut in done:
                    cfg = pending.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        lost.append(cfg)
                        continue
                    yield result
                if not lost:
                    continue
                # a dead worker poisons the whole pool: every run still in flight is lost with it
                lost += pending.values()
                pending.clear()
                log.warning("a worker process died; restarting the pool")
                pool.shutdown(wait=False, cancel_futures=True)
                _terminate(pool)
                pq.close()
                pool, pq = self._pool()
                if len(lost) > 1:  # any of them may be the cause
                    isolate[:0] = lost
                    continue
                cfg = lost[0]  # it broke the pool alone
                rid = _rid(cfg)
                retries[rid] = retries.get(rid, 0) + 1
                if retries[rid] <= self.max_retries:
                    isolate.insert(0, cfg)
                else:
                    from .config import RunConfig
                    from .train import failed_result

                    yield failed_result(RunConfig.from_dict(cfg), "worker process died (killed or OOM)")
            _drain(pq, on_progress)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            _terminate(pool)
            pq.close()


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
