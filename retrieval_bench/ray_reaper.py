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
# are re-parented to init and would otherwise live on. A process started moments before its parent died is
# re-parented before it could be seen: while it stops the instance the reaper also takes every process that holds
# a file of the instance's session folder open (which it learns from the processes it has seen).
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

born, seen, sessions = stat(me)[2], {}, set()

def files(pid):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            yield os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass

def find_sessions():
    # the instance's session folder (<temp>/ray/session_<date>_<pid>), from the files its processes hold open
    for pid in list(seen):
        for path in files(pid):
            parts = path.split("/")
            for i in range(1, len(parts) - 1):
                if parts[i].startswith("session_") and parts[i - 1] == "ray":
                    sessions.add("/".join(parts[: i + 1]) + "/")

def scan(orphans=False):
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := stat(int(name))) is not None:
            procs[int(name)] = st
    children = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = [driver, *seen]
    if orphans and sessions:  # started by a process that died before it was seen: it holds the session's files
        prefixes = tuple(sessions)
        found = [p for p, st in procs.items() if p != me and p not in seen and st[2] >= born
                 and any(f.startswith(prefixes) for f in files(p))]
        for p in found:
            seen[p] = procs[p][2]
        todo += found
    while todo:
        for c in children.get(todo.pop(), ()):
            if c != me and c not in seen and procs[c][2] >= born:
                seen[c] = procs[c][2]
                todo.append(c)

def alive():
    return [p for p, start in seen.items() if (st := stat(p)) is not None and st[2] == start and st[0] != b"Z"]

while True:
    scan()
    if not sessions:
        find_sessions()
    if select.select([sys.stdin], [], [], 0.5)[0] and not os.read(sys.stdin.fileno(), 4096):
        break
if not sessions:
    find_sessions()
# While they die, look again: a dying raylet, or the driver's ray.init still under way, may start processes
# (Ray's agents, workers) after the last look, and one whose parent dies first is re-parented to init: it is
# found by the session files it holds open.
for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
    end, sent = time.monotonic() + wait, set()
    while True:
        scan(orphans=True)
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
