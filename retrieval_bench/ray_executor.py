"""The Ray executor (``--executor ray``): the same job function as the local pool, run as Ray tasks.

Results come back to the driver, which alone writes the store, so resume and skipping behave as with the local
executor. Each run is one task with ``num_cpus=threads_per_run`` that caps torch at as many threads, and
``num_gpus=gpus_per_run`` (``--gpus-per-run``, fractions allowed: 0.25 packs four runs on a GPU); a task without
GPUs trains on the CPU even where ``device = "auto"`` would find one (``on_cpu_unless_given_gpus``). A task
whose worker dies (killed, OOM) is retried by Ray (``max_retries``); after that the run is stored as
``failed`` and the sweep goes on, and a rerun of the command retries it. Live progress goes through a small
actor that the workers post to and the driver drains.

Start-up: ``ray.init`` runs in a helper thread while the driver waits with a time limit
(``start_timeout_s``), so Ctrl-C is handled at once and a machine too busy to start Ray gets a message, not a
hang. A private local instance is watched by a small reaper process (``ray_reaper``) that stops every process the
instance started once the driver ends, however it ends (even by SIGKILL), so no Ray process outlives it.

Ray is an optional extra (``pip install 'retrieval-bench[ray]'``): importing this module needs it.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from .executors import Delivered, Executor, as_run, execute, run_ids, setup_worker
from .ray_reaper import start_reaper

log = logging.getLogger(__name__)

Job = Callable[..., dict[str, Any]]

#: the torch thread count this worker process was set up with (None: not yet)
_worker_threads: int | None = None

#: how long the driver waits for a result before it drains the progress actor again (seconds)
POLL_S = 0.5
#: how long ``ray.init`` may take to start a local instance or to reach a cluster (seconds; Ray took over
#: 110 s, and then hung, on a busy 2-core machine, where 5-10 s is usual)
START_TIMEOUT_S = 120.0


def capacity(resources: dict[str, float], cpus_per_run: int, gpus_per_run: float = 0.0) -> int:
    """Runs a cluster with ``resources`` (``ray.cluster_resources()``) holds at once: as many as its CPUs allow,
    and its GPUs where runs reserve some (at least one)."""
    n = resources.get("CPU", 0) // cpus_per_run
    if gpus_per_run > 0:
        n = min(n, resources.get("GPU", 0) // gpus_per_run)
    return max(1, int(n))


class RayStartError(ConnectionError):
    """Ray did not start (or connect) within the time limit; what it had started is stopped."""


class _QuietThreadWarning(logging.Filter):
    """Drops Ray's warning that ray.init outside the main thread sets no SIGTERM handler: the reaper, not that
    handler, is what stops the instance when the driver is terminated."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


class _ProgressActor:
    """Collects the workers' progress events; the driver takes them all at once with ``drain``."""

    def __init__(self):
        self.events: list[dict[str, Any]] = []

    def put(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


class _ProgressSink:
    """What a task gets as ``progress_queue``: ``put`` posts without waiting, and never fails the run;
    ``flush`` waits until the actor holds every event posted, so they are in before the run's result."""

    def __init__(self, actor):
        self.actor, self._last = actor, None

    def __getstate__(self):
        return {"actor": self.actor, "_last": None}

    def put(self, event: dict[str, Any]) -> None:
        if self.actor is None:
            return
        try:
            self._last = self.actor.put.remote(event)
        except Exception:  # progress is only for the live view: a lost actor must not fail the run
            self.actor = None

    def flush(self, timeout: float = 10.0) -> None:
        if self._last is not None:  # one caller's actor calls run in order: the last one done means all
            try:
                ray.get(self._last, timeout=timeout)
            except Exception as e:
                log.debug("progress flush failed: %s", e)
            self._last = None


def on_cpu_unless_given_gpus(cfg: Any, gpus: float) -> Any:
    """A run's config as a Ray task without GPUs trains it: ``device = "auto"`` becomes ``"cpu"``, since a task
    that reserved no GPU must not take one of its node's (an explicit ``cuda`` stays, and fails there as it would
    anywhere without CUDA). The device is no part of a run's identity, so its id is unchanged."""
    import dataclasses

    run = as_run(cfg)
    if gpus > 0 or str(run.train.device).strip().lower() != "auto":
        return cfg
    return dataclasses.replace(run, train=dataclasses.replace(run.train, device="cpu"))


def _task(job: Job, threads: int, cfg: dict[str, Any], progress: _ProgressSink | None,
          gpus: float = 0.0) -> dict[str, Any]:
    """What a Ray worker runs for one run: the per-worker thread cap, the job function, then the progress
    events flushed (so that the driver sees them before the result). With ``gpus`` > 0 Ray has made the GPUs
    it reserved the task's visible CUDA devices, so ``auto`` finds them."""
    global _worker_threads
    if _worker_threads != threads:  # once per worker process (Ray reuses workers across tasks)
        setup_worker(threads)
        _worker_threads = threads
    if isinstance(cfg, list):  # a group (group.py): every run on the task's device
        cfg = [on_cpu_unless_given_gpus(c, gpus) for c in cfg]
    else:
        cfg = on_cpu_unless_given_gpus(cfg, gpus)
    try:
        return job(cfg, progress)
    finally:
        if progress is not None:
            progress.flush()


class RayExecutor(Executor):
    """Runs each run as a Ray task on a cluster (``address``) or on a local Ray instance started here.

    ``threads_per_run`` is both the task's ``num_cpus`` and its torch thread count. At most as many runs are
    in flight as the cluster has CPUs for (rechecked on every poll, so nodes that join get runs too), so the
    live view's "running" means running. ``job`` is the job function (``executors.execute``; tests inject
    others).
    """

    name = "ray"

    def __init__(self, threads_per_run: int = 1, address: str | None = None, num_cpus: int | None = None,
                 max_retries: int = 1, job: Job = execute, start_timeout_s: float = START_TIMEOUT_S,
                 gpus_per_run: float = 0.0):
        if threads_per_run < 1:
            raise ValueError(f"threads_per_run must be >= 1, got {threads_per_run}")
        if not (gpus_per_run >= 0 and (gpus_per_run <= 1 or float(gpus_per_run).is_integer())):
            raise ValueError(f"--gpus-per-run: {gpus_per_run} is neither a fraction of one GPU (0 to 1) nor a "
                             "whole number of GPUs")
        self.gpus = float(gpus_per_run)
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        self.threads, self.address, self.num_cpus = threads_per_run, address, num_cpus
        self.max_retries, self.job, self.start_timeout_s = max_retries, job, start_timeout_s
        self._started = False  # whether this executor called ray.init (and so disconnects or shuts down)
        self._aborted = False  # whether a start was given up (Ray is then left to the reaper, not called)
        self._release: threading.Event | None = None  # ends the thread that ran ray.init
        self._reaper: subprocess.Popen | None = None
        self._pending: dict[Any, dict[str, Any]] = {}
        self._progress_actor = None
        self._drain_ref = None  # a drain call that did not answer in time: its events are read next time
        self._warned_version = False

    # -- connection ------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        # A Ray session this process already has (a test's, a notebook's) is used as it is. Without an
        # address, ray.init follows Ray's own rules: RAY_ADDRESS, else a cluster that `ray start` began on
        # this machine, else a new local instance (num_cpus: all cores unless given).
        if not ray.is_initialized():
            if self.address:
                try:
                    self._init(address=self.address, log_to_driver=False, ignore_reinit_error=True)
                except RayStartError:
                    raise
                except ConnectionError as e:
                    raise ConnectionError(
                        f"cannot connect to the Ray cluster at {self.address} ({e}). Is it up "
                        "(`ray status`)? If it uses token authentication, set RAY_AUTH_MODE=token here and "
                        "give this machine the cluster's token (see docs/ray.md)") from e
            else:
                self._reaper = start_reaper()
                self._init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                           ignore_reinit_error=True)
            self._started = True
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if largest < self.threads:
            self.close()
            raise ValueError(f"--cpus-per-run {self.threads}: no node of the Ray cluster has that many CPUs "
                             f"(the largest has {largest:g}); runs would wait forever")

    def _init(self, **kwargs) -> None:
        """``ray.init(**kwargs)`` within ``start_timeout_s``, interruptible by Ctrl-C.

        ray.init runs in a helper thread and this thread only waits: ray.init can block in native code, where
        neither a signal nor a deadline reaches it. The helper thread lives on until ``close``, because the
        local instance's processes are bound to the thread that started them (Linux's parent-death signal
        fires when that thread ends). On a timeout or Ctrl-C the reaper stops what was started.
        """
        done, self._release, box = threading.Event(), threading.Event(), {}
        release = self._release

        def start():
            try:
                ray.init(**kwargs)
            except BaseException as e:  # handed to the waiting thread
                box["error"] = e
            done.set()
            release.wait()

        quiet = _QuietThreadWarning()
        ray_log = logging.getLogger("ray._private.worker")
        ray_log.addFilter(quiet)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            threading.Thread(target=start, name="ray-init", daemon=True).start()
            while not done.wait(0.1):
                if time.monotonic() > deadline:
                    where = f"connect to the Ray cluster at {self.address}" if self.address else "start"
                    raise RayStartError(
                        f"--executor ray: Ray did not {where} within {self.start_timeout_s:g} s "
                        "(--ray-start-timeout); a busy machine can take longer. What it had started was stopped. "
                        "Try again with a longer --ray-start-timeout, or use --executor local")
        except BaseException:  # the time limit, or Ctrl-C while Ray starts
            self._abort_start()
            raise
        finally:
            ray_log.removeFilter(quiet)
        if "error" in box:
            self._abort_start()
            raise box["error"]

    def _abort_start(self) -> None:
        """Give up a start: the reaper stops what Ray had started; Ray itself is not called again (it may still
        be inside ray.init)."""
        self._aborted = True
        self._stop_reaper()
        if self._release is not None:
            self._release.set()

    def _stop_reaper(self, timeout: float = 10.0) -> None:
        """Close the reaper's pipe, so that it stops the instance's leftovers, and wait for it to finish."""
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            return
        try:
            reaper.stdin.close()
            reaper.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("the Ray reaper did not finish: %s", e)

    def _capacity(self) -> int:
        """How many runs the cluster can hold at once (at least one)."""
        return capacity(ray.cluster_resources(), self.threads, self.gpus)

    @property
    def device_hint(self) -> str:
        """Where a run with ``device = "auto"`` trains here: on a GPU where runs reserve GPUs, else the CPU
        (``on_cpu_unless_given_gpus``); the sweep sizes ``group = "auto"`` by it."""
        return "cuda" if self.gpus > 0 else "cpu"

    @property
    def workers(self) -> int:
        """Runs in flight at once (what the live view reports as workers)."""
        return self._capacity() if ray.is_initialized() else 1

    # -- running ---------------------------------------------------------------------------------------------

    def run(self, configs, on_start=None, on_progress=None):
        todo = list(configs)
        if not todo:  # nothing to do (everything stored): do not start Ray at all
            return
        self._connect()
        if self.gpus and not ray.cluster_resources().get("GPU"):
            raise ValueError(f"--gpus-per-run {self.gpus:g}: the Ray cluster has no GPUs")
        from .group import spread

        todo = spread(todo, self._capacity())  # groups split until the cluster's every slot has work
        remote = ray.remote(_task).options(num_cpus=self.threads, num_gpus=self.gpus, max_retries=self.max_retries,
                                           name="retrieval-bench-run")
        progress = None
        if on_progress is not None:
            self._progress_actor = ray.remote(_ProgressActor).options(num_cpus=0).remote()
            progress = _ProgressSink(self._progress_actor)
        pending, delivered = self._pending, Delivered()
        try:
            while todo or pending:
                if todo:
                    room = self._capacity() - len(pending)
                    for _ in range(min(room, len(todo))):
                        cfg = todo.pop(0)
                        pending[remote.remote(self.job, self.threads, cfg, progress, self.gpus)] = cfg
                        if on_start:
                            for rid in run_ids(cfg):
                                on_start({"run_id": rid})
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                if ready:  # take every other result that is in too
                    rest = [r for r in pending if r not in ready]
                    if rest:
                        ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                yield from delivered.new(self._drain(on_progress))
                for ref in ready:
                    item = pending.pop(ref)
                    result = self._result(ref, item, lost_ok=isinstance(item, list))
                    if result is None:  # a group lost with its worker: its unfinished runs again, each alone
                        todo[:0] = delivered.remaining(item)
                        continue
                    yield from delivered.new(result)
            yield from delivered.new(self._drain(on_progress))
        finally:
            self._cancel_pending()
            self._stop_progress()

    def _result(self, ref, cfg: dict[str, Any] | list, lost_ok: bool = False
                ) -> dict[str, Any] | list[dict[str, Any]] | None:
        """A task's record (a group's: their list). A task Ray lost gives its run a ``failed`` record; with
        ``lost_ok`` (a group), None instead, and the driver reruns the group's unfinished runs one by one, so
        that only a run that kills its worker alone is stored ``failed``."""
        try:
            result = ray.get(ref)
        except RayError as e:  # the worker died after its retries, the node was lost, or the job raised
            if lost_ok and not isinstance(e, RayTaskError):
                log.warning("a group of %d runs was lost on Ray (%s); its unfinished runs train alone",
                            len(cfg), type(e).__name__)
                return None
            from .train import failed_result

            log.warning("run %s failed on Ray: %s", ", ".join(run_ids(cfg)), type(e).__name__)
            if isinstance(e, RayTaskError):  # the job itself raised (not retried): keep its traceback
                error = f"the job raised on a Ray worker: {e}"
            else:
                error = f"Ray lost the run (after {self.max_retries} retries): {type(e).__name__}: {e}"
            failed = [failed_result(as_run(c), error) for c in (cfg if isinstance(cfg, list) else [cfg])]
            return failed if isinstance(cfg, list) else failed[0]
        for r in result if isinstance(result, list) else [result]:
            self._check_version(r)
        return result

    def _check_version(self, result: dict[str, Any]) -> None:
        from . import __version__

        theirs = result.get("row", {}).get("version")
        if theirs and theirs != __version__ and not self._warned_version:
            self._warned_version = True
            log.warning("a Ray worker runs retrieval-bench %s, the driver %s: install the same version on "
                        "every node", theirs, __version__)

    def _drain(self, on_progress) -> list[dict[str, Any]]:
        """Hand the progress events to ``on_progress``; returns the records that came with them (a group's runs
        that ended, streamed before the group's task returns)."""
        if self._progress_actor is None or on_progress is None:
            return []
        ref = self._progress_actor.drain.remote() if self._drain_ref is None else self._drain_ref
        self._drain_ref = None
        try:
            events = ray.get(ref, timeout=10)
        except GetTimeoutError:  # kept: the events this call took from the actor are read on the next poll
            self._drain_ref = ref
            return []
        except RayError:  # the actor is gone: the live view misses some steps; the runs are unaffected
            return []
        results = []
        for event in events:
            if "result" in event:
                results.append(event["result"])
            else:
                on_progress(event)
        return results

    def _cancel_pending(self) -> None:
        """Stop the runs still in flight (Ctrl-C, a driver error): their results would be lost anyway."""
        for ref in list(self._pending):
            try:
                ray.cancel(ref, force=True)
            except Exception as e:  # already finished or the cluster is gone: nothing left to stop
                log.debug("cancel failed: %s", e)
        self._pending.clear()

    def _stop_progress(self) -> None:
        if self._progress_actor is not None:
            try:
                ray.kill(self._progress_actor)
            except Exception as e:
                log.debug("could not stop the progress actor: %s", e)
            self._progress_actor = self._drain_ref = None

    def close(self) -> None:
        """Stop what is still running, then end this process's Ray session if this executor began it.

        For a local instance that ends the instance (and the reaper then stops any process of it that is
        left); for a cluster given by ``address`` it only disconnects this driver (``ray.shutdown`` never stops
        a cluster started with ``ray start``). A session this process had before the executor (a test's) is
        left as it is.
        """
        if self._aborted:  # a start given up: Ray may still be inside ray.init; the reaper has done the rest
            self._started = False
            return
        if ray.is_initialized():
            self._cancel_pending()
            self._stop_progress()
        if self._started:
            ray.shutdown()
            self._started = False
        if self._release is not None:  # only now may the thread that started the instance end
            self._release.set()
            self._release = None
        self._stop_reaper()
