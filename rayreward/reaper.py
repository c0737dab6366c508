"""Ray's local processes do not outlive a driver killed with SIGKILL.

A local Ray that `ray.init` starts is the driver's: when the driver ends normally it shuts the
processes down, and on SIGKILL most follow their raylet. Two do not (measured with Ray 2.60):
`ray::DashboardAgent` and `ray::RuntimeEnvAgent` are re-parented to init and live on, holding
ports and memory. After starting a local Ray the driver starts this watchdog
(`python -m rayreward.reaper DRIVER_PID PID...`, Linux only: it reads /proc) with every process
the driver then has below it. The watchdog polls the driver; once it is gone, it gives Ray a few
seconds to stop on its own, then kills what is left of those processes. A process is identified
by its pid and its start time, so a recycled pid is never killed. It imports nothing heavy and
ends with the driver's processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 5.0  # after the driver is gone: Ray's own shutdown first
POLL_S = 1.0


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it
    is gone or has ended (a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` now (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def watch(driver: int, victims: dict[int, int], grace_s: float = GRACE_S, poll_s: float = POLL_S) -> list[int]:
    """Wait for `driver` to end, then SIGKILL each victim (pid -> start time) still alive after
    `grace_s`. Returns the pids killed."""
    born = start_time(driver)
    while born is not None and start_time(driver) == born:
        time.sleep(poll_s)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(start_time(p) == t for p, t in victims.items()):
        time.sleep(min(poll_s, grace_s))
    killed = []
    for pid, t in victims.items():
        if start_time(pid) == t:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def start(driver: int | None = None) -> subprocess.Popen | None:
    """Start the watchdog over every process below `driver` (default: this process); None where
    /proc is not there (not Linux)."""
    if not Path("/proc/self/stat").exists():
        return None
    driver = os.getpid() if driver is None else driver
    victims = [str(p) for p in descendants(driver)]
    # its own session: a Ctrl-C to the driver's terminal does not reach it
    return subprocess.Popen([sys.executable, "-m", "rayreward.reaper", str(driver), *victims],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    pids = [int(a) for a in sys.argv[2:]]
    watch(int(sys.argv[1]), {p: t for p in pids if (t := start_time(p)) is not None})
