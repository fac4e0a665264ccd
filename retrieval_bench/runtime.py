"""Process and device set-up at the edge (DESIGN §9): the device a run uses, threads, malloc tuning, timing and
peak memory on that device, and a CUDA graph of a fixed-shape computation.

Everything here is a leaf (torch and the standard library only), so that the CLI, bench, the executors and the
memories may all import it.

- ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")``: the device a setting names, or one clear error.
- ``synchronize``, ``timed``, ``time_calls``: wall time of work on a device, CUDA work included.
- ``reset_peak_memory`` / ``peak_memory_mb``: the high-water mark since a reset (CUDA: the caching allocator's
  ``max_memory_allocated``; CPU: the process's peak resident set, VmHWM); ``peak_memory_increase_mb(fn)``: the
  largest increase above the live memory while ``fn`` runs (what ``bench`` reports).
- ``tune_malloc``, ``set_threads``, ``setup_process``: the per-process settings of bench and the executors.
- ``StaticGraph``: a function of fixed-shape tensors captured once as a CUDA graph and replayed with new inputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


# ---------------------------------------------------------------------------------------------------- device
def resolve_device(setting: str | torch.device = "auto", field: str = "device") -> torch.device:
    """The device a setting names: ``auto`` (the first CUDA device if there is one, else the CPU), ``cpu``,
    ``cuda`` (the current CUDA device) or ``cuda:N``.

    Args:
        setting: the setting's value (a ``torch.device`` is checked the same way).
        field: the setting's name, for the error message (``--device``, ``[train] device``).

    Raises:
        ValueError: naming ``field``, for an unknown setting, a CUDA device where CUDA is not available, or an
            index beyond the CUDA devices present.
    """
    text = str(setting).strip().lower() if isinstance(setting, str | torch.device) else None
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", text or "")
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"{field}: unknown device {setting!r}; expected auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"{field}: {setting!r} asks for CUDA, which is not available here ({why}); "
                         "use auto or cpu")
    count = torch.cuda.device_count()
    n = torch.cuda.current_device() if index is None else int(index)
    if n >= count:
        raise ValueError(f"{field}: {setting!r} names CUDA device {n}, but only {count} "
                         f"(0..{count - 1}) are present")
    return torch.device("cuda", n)


def device_name(device: torch.device) -> str:
    """A readable name for a device: the GPU's product name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, whose ops finish before they return)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing:
    """What ``timed`` measured: ``seconds`` (None until the block ends)."""

    seconds: float | None = None


@contextlib.contextmanager
def timed(device: torch.device) -> Iterator[Timing]:
    """Wall time of the block on ``device``: queued CUDA work is waited for on entry and on exit, so the time
    is the block's own work, kernels included (perf_counter, not CUDA events: a training step's cost is its
    wall time, launch overhead and host work included).
    """
    timing = Timing()
    synchronize(device)
    t0 = time.perf_counter()
    yield timing
    synchronize(device)
    timing.seconds = time.perf_counter() - t0


def time_calls(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1,
               budget_s: float | None = None) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones, each timed with ``timed``.

    ``budget_s`` stops the timed calls early once they have taken that long in all (at least one is timed).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeat):
        with timed(device) as t:
            fn()
        times.append(t.seconds)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return times


# ---------------------------------------------------------------------------------------------------- memory
def _libc():
    if platform.system() != "Linux":
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt  # noqa: B018  (glibc only: musl has no mallopt)
        return lib
    except (OSError, AttributeError):
        return None


def tune_malloc() -> bool:
    """Keep freed tensor memory in the process instead of returning it to the OS (glibc only).

    By default glibc serves allocations of 32 MB and more with mmap and unmaps them on free, so every training
    step faults in (and zeroes) its large tensors afresh; on this kind of VM that made a 30 MB elementwise op
    4-5x slower than the op itself. Disabling mmap for allocations (they then come from the heap) and never
    trimming the heap's top lets the next step reuse the same pages. Call it once per worker process, before
    training. The cost: the process keeps its high-water mark of memory.

    Returns:
        True where the settings took effect (glibc), else False.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest glibc accepts; also stops its dynamic raise
    ok &= libc.mallopt(_M_MMAP_MAX, 0)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(ok)


def malloc_trim() -> None:
    """Return the allocator's cached free memory to the OS (glibc; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (at least 1); returns the previous setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    return old


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` inside the block (unchanged where ``n`` is None or 0)."""
    old = set_threads(n) if n else None
    try:
        yield
    finally:
        if old is not None:
            torch.set_num_threads(old)


def setup_process(threads: int | None = None) -> None:
    """A process that trains runs: its threads (where given) and ``tune_malloc``."""
    if threads:
        set_threads(threads)
    tune_malloc()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new high-water mark for ``peak_memory_mb``. Returns False where the CPU's cannot be reset (no
    writable /proc/self/clear_refs): ``peak_memory_mb`` is then the process's peak since it started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _reset_hwm()


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory (MB) since the last ``reset_peak_memory``: CUDA, the tensors allocated at once on the device
    (``torch.cuda.max_memory_allocated``); CPU, the process's peak resident set (VmHWM), None off Linux."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _hwm_bytes() / 2**20
    except OSError:
        return None


def peak_memory_increase_mb(fn: Callable[[], object], device: torch.device | None = None) -> float | None:
    """Largest increase of memory (MB) above the live memory while ``fn()`` runs.

    CUDA: the caching allocator's peak of allocated tensors minus what was allocated before. CPU: the resident
    set's high-water mark (VmHWM) reset just before, after returning the allocator's free memory to the OS,
    so allocator fragmentation is included; where clear_refs cannot be written, a thread samples the resident
    set every 0.5 ms instead (which can miss shorter spikes). None off Linux.
    """
    device = torch.device("cpu") if device is None else device
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return None
    gc.collect()
    malloc_trim()  # return cached free memory, so that the step must fault in whatever it uses
    base = _rss_bytes()
    if _reset_hwm():
        fn()
        return (_hwm_bytes() - base) / 2**20
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (max(peak[0], _rss_bytes()) - base) / 2**20


# ---------------------------------------------------------------------------------------------------- graphs
Capture = Callable[[Callable[[], Sequence[torch.Tensor]]], tuple[list[torch.Tensor], Callable[[], None]]]


def cuda_capture(fn: Callable[[], Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Capture ``fn()`` as a CUDA graph: returns its output tensors and the replay that refills them.

    ``fn`` runs twice on a side stream first (as torch's docs ask: cuBLAS and the allocator set themselves up
    outside the capture), then once under capture. Its work may allocate (from the graph's private pool) but
    must not synchronise with the host or branch on tensor values.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a backward runs on autograd's device thread while the main thread only waits for it
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = list(fn())
    return outputs, graph.replay


def rerun_capture(fn: Callable[[], Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """A stand-in for ``cuda_capture`` on any device: the "replay" runs ``fn`` again and copies its results into
    the first call's outputs, so code written for a graph (static inputs in, static outputs out) runs and is
    tested without a GPU."""
    outputs = list(fn())

    def replay():
        for out, new in zip(outputs, fn(), strict=True):
            out.copy_(new)

    return outputs, replay


class StaticGraph:
    """``fn(*inputs) -> tensors`` of fixed shapes, captured once on static copies of ``example_inputs`` and
    replayed for new inputs of the same shapes, dtypes and device.

    A call copies its inputs into the static ones, replays, and returns clones of the outputs (the next replay
    overwrites the static ones). ``capture`` is ``cuda_capture`` by default; ``rerun_capture`` runs the same
    data flow without CUDA (the tests).
    """

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], example_inputs: Sequence[torch.Tensor],
                 capture: Capture | None = None):
        self.inputs = [x.detach().clone() for x in example_inputs]
        self.outputs, self._replay = (capture or cuda_capture)(lambda: fn(*self.inputs))

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"StaticGraph: {len(inputs)} inputs given, captured with {len(self.inputs)}")
        for static, x in zip(self.inputs, inputs, strict=True):
            if static.shape != x.shape or static.dtype != x.dtype or static.device != x.device:
                raise ValueError(f"StaticGraph: input {tuple(x.shape)} {x.dtype} on {x.device} differs from the "
                                 f"captured {tuple(static.shape)} {static.dtype} on {static.device}")
            static.copy_(x)
        self._replay()
        return [out.clone() for out in self.outputs]
