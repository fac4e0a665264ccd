"""The Ray executor (``--executor ray``): the same job function as the local pool, run as Ray tasks.

Results come back to the driver, which alone writes the store, so resume and skipping behave as with the local
executor. Each run is one task with ``num_cpus=threads_per_run`` that caps torch at as many threads. A task
whose worker dies (killed, OOM) is retried by Ray (``max_retries``); after that the run is stored as
``failed`` and the sweep goes on, and a rerun of the command retries it. Live progress goes through a small
actor that the workers post to and the driver drains.

Ray is an optional extra (``pip install 'retrieval-bench[ray]'``): importing this module needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from .executors import Executor, _rid, execute, setup_worker

log = logging.getLogger(__name__)

Job = Callable[..., dict[str, Any]]

#: the torch thread count this worker process was set up with (None: not yet)
_worker_threads: int | None = None

#: how long the driver waits for a result before it drains the progress actor again (seconds)
POLL_S = 0.5


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


def _task(job: Job, threads: int, cfg: dict[str, Any], progress: _ProgressSink | None) -> dict[str, Any]:
    """What a Ray worker runs for one run: the per-worker thread cap, the job function, then the progress
    events flushed (so that the driver sees them before the result)."""
    global _worker_threads
    if _worker_threads != threads:  # once per worker process (Ray reuses workers across tasks)
        setup_worker(threads)
        _worker_threads = threads
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
                 max_retries: int = 1, job: Job = execute):
        if threads_per_run < 1:
            raise ValueError(f"threads_per_run must be >= 1, got {threads_per_run}")
        self.threads, self.address, self.num_cpus = threads_per_run, address, num_cpus
        self.max_retries, self.job = max_retries, job
        self._started = False  # whether this executor called ray.init (and so disconnects or shuts down)
        self._pending: dict[Any, dict[str, Any]] = {}
        self._progress_actor = None
        self._warned_version = False

    # -- connection ------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        # A Ray session this process already has (a test's, a notebook's) is used as it is. Without an
        # address, ray.init follows Ray's own rules: RAY_ADDRESS, else a cluster that `ray start` began on
        # this machine, else a new local instance (num_cpus: all cores unless given).
        if not ray.is_initialized():
            if self.address:
                try:
                    ray.init(address=self.address, log_to_driver=False, ignore_reinit_error=True)
                except ConnectionError as e:
                    raise ConnectionError(
                        f"cannot connect to the Ray cluster at {self.address} ({e}). Is it up "
                        "(`ray status`)? If it uses token authentication, set RAY_AUTH_MODE=token here and "
                        "give this machine the cluster's token (see docs/ray.md)") from e
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True)
            self._started = True
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if largest < self.threads:
            raise ValueError(f"--cpus-per-run {self.threads}: no node of the Ray cluster has that many CPUs "
                             f"(the largest has {largest:g}); runs would wait forever")

    def _capacity(self) -> int:
        """How many runs the cluster can hold at once (at least one)."""
        return max(1, int(ray.cluster_resources().get("CPU", 0) // self.threads))

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
        remote = ray.remote(_task).options(num_cpus=self.threads, max_retries=self.max_retries,
                                           name="retrieval-bench-run")
        progress = None
        if on_progress is not None:
            self._progress_actor = ray.remote(_ProgressActor).options(num_cpus=0).remote()
            progress = _ProgressSink(self._progress_actor)
        pending = self._pending
        try:
            while todo or pending:
                if todo:
                    room = self._capacity() - len(pending)
                    for _ in range(min(room, len(todo))):
                        cfg = todo.pop(0)
                        pending[remote.remote(self.job, self.threads, cfg, progress)] = cfg
                        if on_start:
                            on_start({"run_id": _rid(cfg)})
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                if ready:  # take every other result that is in too
                    rest = [r for r in pending if r not in ready]
                    if rest:
                        ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                self._drain(on_progress)
                for ref in ready:
                    yield self._result(ref, pending.pop(ref))
            self._drain(on_progress)
        finally:
            self._cancel_pending()
            self._stop_progress()

    def _result(self, ref, cfg: dict[str, Any]) -> dict[str, Any]:
        try:
            result = ray.get(ref)
        except RayError as e:  # the worker died after its retries, the node was lost, or the job raised
            from .config import RunConfig
            from .train import failed_result

            log.warning("run %s failed on Ray: %s", _rid(cfg), type(e).__name__)
            if isinstance(e, RayTaskError):  # the job itself raised (not retried): keep its traceback
                error = f"the job raised on a Ray worker: {e}"
            else:
                error = f"Ray lost the run (after {self.max_retries} retries): {type(e).__name__}: {e}"
            return failed_result(RunConfig.from_dict(cfg), error)
        self._check_version(result)
        return result

    def _check_version(self, result: dict[str, Any]) -> None:
        from . import __version__

        theirs = result.get("row", {}).get("version")
        if theirs and theirs != __version__ and not self._warned_version:
            self._warned_version = True
            log.warning("a Ray worker runs retrieval-bench %s, the driver %s: install the same version on "
                        "every node", theirs, __version__)

    def _drain(self, on_progress) -> None:
        if self._progress_actor is None or on_progress is None:
            return
        try:
            events = ray.get(self._progress_actor.drain.remote(), timeout=10)
        except (RayError, GetTimeoutError):  # the live view misses some steps; the runs are unaffected
            return
        for event in events:
            on_progress(event)

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
            self._progress_actor = None

    def close(self) -> None:
        """Stop what is still running, then end this process's Ray session if this executor began it.

        For a local instance that ends the instance; for a cluster given by ``address`` it only disconnects
        this driver (``ray.shutdown`` never stops a cluster started with ``ray start``). A session this
        process had before the executor (a test's) is left as it is.
        """
        if ray.is_initialized():
            self._cancel_pending()
            self._stop_progress()
        if self._started:
            ray.shutdown()
            self._started = False
