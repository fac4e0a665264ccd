"""Where runs execute: in this process, on a local process pool (default), or on Ray (``ray_executor.py``).

Every executor runs the same job function, ``execute``, and hands results back to the driver, which alone
writes the store. ``Executor.run`` yields results as runs finish and reports live progress through a callback.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RunConfig

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


def setup_worker(threads: int, driver_pid: int | None = None) -> None:
    """Per-worker settings: cap torch's threads so workers do not oversubscribe the cores, and exit when the
    driver is gone (a SIGKILLed driver cannot tell its pool to stop, and an orphan would hold a core).

    ``driver_pid`` is the process the worker serves (default: its parent now). Given by the driver, it also
    catches a driver that died while this worker was still starting, when the parent is already init.
    """
    import threading

    parent = os.getppid() if driver_pid is None else driver_pid
    if os.getppid() != parent:
        os._exit(1)

    def watch_parent():
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch_parent, daemon=True, name="watch-driver").start()
    import torch

    torch.set_num_threads(max(1, threads))
    from .runtime import tune_malloc

    tune_malloc()


_progress_queue = None  # in a pool worker: where its runs report progress (set by ``_setup_pool_worker``)
_spool_dir = None  # in a pool worker: where a group's finished records go (set by ``_setup_pool_worker``)


def _setup_pool_worker(threads: int, driver_pid: int, progress_queue, spool_dir: str | None = None) -> None:
    """A local pool's worker: ``setup_worker``, SIGINT ignored (Ctrl-C in a terminal reaches the whole process
    group; the driver alone decides, and stops its workers), and the progress queue it inherits at its start.

    The queue is a ``SimpleQueue``, passed at the worker's start rather than served by a ``Manager`` process
    (which would outlive a SIGKILLed driver). Its ``put`` writes to the pipe before returning, so a run's
    last event is readable before its result reaches the driver.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _progress_queue, _spool_dir
    _progress_queue, _spool_dir = progress_queue, spool_dir
    setup_worker(threads, driver_pid)


def execute(cfg: RunConfig | dict[str, Any] | list, progress_queue=None) -> dict[str, Any] | list[dict[str, Any]]:
    """The job function: train one run from its config (or its dict), or a group of them (a list: group.py);
    never raises (an error becomes ``failed``). A group returns its records in a list, and also puts each on
    ``progress_queue`` as ``{"run_id", "result"}`` as soon as its run ends, so that the driver stores it then."""
    from .train import failed_result, train_run

    progress = None
    if progress_queue is not None:
        def progress(event):
            progress_queue.put({**event, "pid": os.getpid()})
    if isinstance(cfg, list):
        return _execute_group([as_run(c) for c in cfg], progress)
    cfg = as_run(cfg)
    t0 = time.perf_counter()
    try:
        return train_run(cfg, progress=progress)
    except Exception:  # a run's error must not end the sweep; it is stored with its traceback
        return failed_result(cfg, traceback.format_exc(), time.perf_counter() - t0)


def _execute_group(cfgs: list[RunConfig], progress: Progress | None) -> list[dict[str, Any]]:
    from .group import train_group
    from .train import failed_result

    results: list[dict[str, Any]] = []
    try:
        for result in train_group(cfgs, progress):
            results.append(result)
            if progress is not None:
                progress({"run_id": result["row"]["run_id"], "result": result})
    except Exception:  # the group's machinery itself: every run not yet ended is stored as failed
        ended = {r["row"]["run_id"] for r in results}
        results += [failed_result(c, traceback.format_exc()) for c in cfgs if c.run_id not in ended]
    return results


def run_ids(item: RunConfig | dict[str, Any] | list) -> list[str]:
    """The run ids of a work item (a run, its dict, or a group)."""
    return [as_run(c).run_id for c in (item if isinstance(item, list) else [item])]


class Delivered:
    """The records a driver has handed on, so that a group's records, streamed as its runs end and returned
    again with the group, are stored once, and a lost group reruns only the runs it had not finished."""

    def __init__(self):
        self.ids: set[str] = set()

    def new(self, results: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records of ``results`` (a record or a group's list) not handed on before; now they are."""
        fresh = []
        for r in results if isinstance(results, list) else [results]:
            rid = r["row"]["run_id"]
            if rid not in self.ids:
                self.ids.add(rid)
                fresh.append(r)
        return fresh

    def remaining(self, item) -> list:
        """The runs of a lost work item still without a record, each alone (for the isolation rule)."""
        return [c for c in (item if isinstance(item, list) else [item]) if as_run(c).run_id not in self.ids]


def _execute_in_pool(job: Callable[..., dict[str, Any]], cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return job(cfg_dict, _SpoolingQueue(_progress_queue, _spool_dir))


class _SpoolingQueue:
    """A pool worker's progress queue: progress events (a few hundred bytes, written to the pipe in one piece)
    go to the queue; a finished run's record (``{"run_id", "result"}``, up to megabytes) goes to a file of the
    spool folder, written under a temporary name and renamed into place, so that the driver reads whole records
    only, and a worker killed while writing one cannot leave half a message in the pipe (the driver would wait
    on it for ever)."""

    def __init__(self, queue, spool: str | None):
        self.queue, self.spool = queue, spool

    def put(self, event: dict[str, Any]) -> None:
        if "result" not in event or self.spool is None:
            self.queue.put(event)
            return
        import pickle

        path = os.path.join(self.spool, f"{event['run_id']}.{os.getpid()}")
        with open(path + ".tmp", "wb") as f:
            pickle.dump(event["result"], f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(path + ".tmp", path + ".pkl")


def read_spool(spool: str | None) -> list[dict[str, Any]]:
    """The records in the spool folder (each read once: its file is removed)."""
    import pickle

    if spool is None or not os.path.isdir(spool):
        return []
    records = []
    for name in sorted(os.listdir(spool)):
        if not name.endswith(".pkl"):
            continue
        path = os.path.join(spool, name)
        try:
            with open(path, "rb") as f:
                records.append(pickle.load(f))
        except (OSError, EOFError, pickle.UnpicklingError) as e:  # renamed whole, so this is not expected
            log.warning("a spooled record could not be read (%s); its run is redone", e)
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)
    return records


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

        from .runtime import tune_malloc

        # as the pool's workers do: runs in this process reuse their large tensors' pages (a process-wide
        # setting that stays: the process keeps its high-water mark of memory)
        tune_malloc()
        old = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        sink = _CallbackSink(on_progress) if on_progress else None
        try:
            for item in configs:
                if on_start:
                    for rid in run_ids(item):
                        on_start({"run_id": rid})
                if isinstance(item, list):  # a group: each record as its run ends
                    from .group import train_group

                    yield from train_group([as_run(c) for c in item], on_progress)
                else:
                    yield execute(item, sink)
        finally:
            torch.set_num_threads(old)


class _CallbackSink:
    """Queue-like ``put`` that calls the live view directly, for runs in this process."""

    def __init__(self, callback: Progress):
        self.put = callback


def as_run(cfg: RunConfig | dict[str, Any]) -> RunConfig:
    """A run's config: the ``RunConfig`` itself (what the sweep sends), or one parsed from its dict (the stored
    form, which tests and older callers pass)."""
    from .config import RunConfig

    return cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)


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
        self._current = None  # the pool in use and its queue
        self.spool: str | None = None  # during run: the folder where workers leave a group's finished records

    def _pool(self):
        """A fresh pool with a fresh progress queue: a worker killed while writing may leave a queue's lock
        held, so a restarted pool never shares its predecessor's queue."""
        pq = self._ctx.SimpleQueue()
        pool = ProcessPoolExecutor(self.workers, mp_context=self._ctx, initializer=_setup_pool_worker,
                                   initargs=(self.threads, os.getpid(), pq, self.spool))
        self._current = (pool, pq)
        return pool, pq

    def run(self, configs, on_start=None, on_progress=None):
        import shutil
        import tempfile

        self.spool = tempfile.mkdtemp(prefix="retrieval-bench-spool-")
        runs = None
        try:
            runs = _PoolRuns(self, list(configs), on_start, on_progress)
            while runs.unfinished():
                lost = runs.submit()
                if lost is None:  # every submission went in: wait a moment for results
                    results, lost, error = runs.collect()
                    yield from results  # the runs that finished are stored before anything is raised
                    if error is not None:
                        raise error
                    if not lost:
                        continue
                failed = runs.restart(lost)
                yield from runs.take_spooled()  # what the lost workers had finished, read before the rerun
                if failed is not None:
                    yield failed
            yield from runs.delivered.new(_drain(runs.pq, on_progress) + read_spool(self.spool))
        finally:
            if runs is not None:
                _stop(runs.pool, runs.pq)
            self._current = None
            shutil.rmtree(self.spool, ignore_errors=True)
            self.spool = None

    def close(self) -> None:
        """Stop the workers of a sweep that did not finish (Ctrl-C while the driver was elsewhere)."""
        current, self._current = self._current, None
        if current is not None:
            _stop(*current)


class _PoolRuns:
    """The state of one ``LocalExecutor.run``: the runs still to do, those in flight, and the rule that finds
    the run that kills its workers. Normally up to ``workers`` runs from ``todo`` are in flight. After a pool
    breaks, its runs in flight go to ``isolate`` and are rerun one at a time (``alone``) on a fresh pool: one
    that breaks a pool alone is retried ``max_retries`` times, then stored ``failed``."""

    def __init__(self, executor: LocalExecutor, todo: list, on_start: Progress | None,
                 on_progress: Progress | None):
        self.executor, self.todo, self.on_start, self.on_progress = executor, todo, on_start, on_progress
        self.isolate: list = []  # runs in flight when a pool broke: rerun one at a time
        self.retries: dict[str, int] = {}
        self.pending: dict[Future, Any] = {}
        self.alone = False  # whether the one run in flight is an isolated one
        self.delivered = Delivered()
        self.spooled: list[dict[str, Any]] = []  # records read by ``restart``, not yet handed on
        self.pool, self.pq = executor._pool()

    def unfinished(self) -> bool:
        return bool(self.todo or self.isolate or self.pending)

    def submit(self) -> list | None:
        """Fill the pool from ``isolate`` (one at a time) or ``todo``. Returns None, or, where the pool turned
        out broken (a worker died between polls), the runs lost with it (the one being submitted never ran and
        goes back to its list)."""
        if not self.pending:
            self.alone = bool(self.isolate)
        source, limit = (self.isolate, 1) if self.alone else (self.todo, self.executor.workers)
        while source and len(self.pending) < limit:
            cfg = source.pop(0)
            try:
                fut = self.pool.submit(_execute_in_pool, self.executor.job, cfg)
            except BrokenProcessPool:
                source.insert(0, cfg)
                return []
            self.pending[fut] = cfg
            if self.on_start:
                for rid in run_ids(cfg):
                    self.on_start({"run_id": rid})
        return None

    def collect(self) -> tuple[list[dict[str, Any]], list, BaseException | None]:
        """Wait up to 0.5 s for runs to end: (their results, the runs lost with a broken pool, the first other
        error a run raised, which the caller raises once the results before it are stored)."""
        done, _ = wait(list(self.pending), timeout=0.5, return_when=FIRST_COMPLETED)
        results = self.delivered.new(_drain(self.pq, self.on_progress) + read_spool(self.executor.spool))
        lost, error = [], None
        for fut in done:
            cfg = self.pending.pop(fut)
            try:
                results += self.delivered.new(fut.result())
            except BrokenProcessPool:
                lost += self.delivered.remaining(cfg)
            except BaseException as e:  # noqa: BLE001  (kept, raised after the others are yielded)
                error = error or e
        return results, lost, error

    def take_spooled(self) -> list[dict[str, Any]]:
        spooled, self.spooled = self.spooled, []
        return spooled

    def restart(self, lost: list) -> dict[str, Any] | None:
        """A dead worker poisons the whole pool, and every run still in flight is lost with it: start a fresh
        pool and decide what to rerun. Returns the ``failed`` record of a run out of retries, else None."""
        log.warning("a worker process died; restarting the pool")
        _stop(self.pool, self.pq)
        # the records the lost groups had finished: stored, not rerun (their files are whole or absent)
        self.spooled += self.delivered.new(read_spool(self.executor.spool))
        lost = [c for item in lost for c in self.delivered.remaining(item)]
        for item in self.pending.values():  # a group in flight: its runs not yet stored, each alone
            lost += self.delivered.remaining(item)
        self.pending.clear()
        self.pool, self.pq = self.executor._pool()
        if not (self.alone and len(lost) == 1):  # any of them may be the cause: rerun each alone
            self.isolate[:0] = lost
            return None
        cfg = lost[0]  # it broke the pool alone
        rid = as_run(cfg).run_id
        self.retries[rid] = self.retries.get(rid, 0) + 1
        if self.retries[rid] <= self.executor.max_retries:
            self.isolate.insert(0, cfg)
            return None
        from .train import failed_result

        return failed_result(as_run(cfg), "worker process died (killed or OOM)")


def _drain(pq, on_progress) -> list[dict[str, Any]]:
    """Hand the queue's progress events to ``on_progress``; returns the records that came with them (a group's
    runs that ended)."""
    results = []
    try:
        while not pq.empty():
            event = pq.get()
            if "result" in event:
                results.append(event["result"])
            elif on_progress:
                on_progress(event)
    except (OSError, EOFError, ValueError):  # a queue closed or broken by a dead worker: progress is best effort
        pass
    return results


def _stop(pool: ProcessPoolExecutor, pq) -> None:
    """Stop a pool now: kill the workers still training (their runs are lost anyway and redone on the next
    call), then shut it down. In that order: ``shutdown`` forgets the pool's processes."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        if p.is_alive():
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    pq.close()


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
