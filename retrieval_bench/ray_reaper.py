"""The reaper of a private local Ray instance: a small process that stops every process the instance started
once the driver ends, however it ends (even by SIGKILL), so that no Ray process outlives the driver."""

from __future__ import annotations

import os
import subprocess
import sys

# The reaper: a separate small process (plain Python, no imports of this package, so it starts in tens of ms)
# that records every process descended from the driver since the reaper began, and when its stdin closes (the
# driver closed it, or died) stops those still alive: SIGTERM, then SIGKILL. Recording as they appear is what
# it takes: when the driver dies its children die with it (Ray binds them to it), but theirs (Ray's agents)
# are re-parented to init and would otherwise live on.
_REAPER = r"""
import os, select, signal, sys, time
driver, me = int(sys.argv[1]), os.getpid()

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])  # state, ppid, start time (clock ticks after boot)

born, seen = stat(me)[2], {}

def scan():
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := stat(int(name))) is not None:
            procs[int(name)] = st
    children = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = [driver, *seen]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c != me and c not in seen and procs[c][2] >= born:
                seen[c] = procs[c][2]
                todo.append(c)

def alive():
    return [p for p, start in seen.items() if (st := stat(p)) is not None and st[2] == start and st[0] != b"Z"]

while True:
    scan()
    if select.select([sys.stdin], [], [], 0.5)[0] and not os.read(sys.stdin.fileno(), 4096):
        break
# While they die, look again: a dying raylet, or the driver's ray.init still under way, may start processes
# (Ray's agents) after the last look; those must get the signal before their parent dies and leaves them orphaned.
for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
    end, sent = time.monotonic() + wait, set()
    while True:
        scan()
        for p in alive():
            if p not in sent:
                sent.add(p)
                try:
                    os.kill(p, sig)
                except OSError:
                    pass
        if not alive() or time.monotonic() >= end:
            break
        time.sleep(0.05)
"""


def start_reaper() -> subprocess.Popen | None:
    """The reaper for a Ray instance this process is about to start, or None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    # its own session: a Ctrl-C at the terminal (SIGINT to the driver's process group) must not end it first
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
