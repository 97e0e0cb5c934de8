"""Signals to a process and everything it started, found through /proc (Linux).

The session's processes stay in the session of the command that started them (no new process
session, no new group), so that whatever ends the command (the device tool's time limit) ends them
all too: a session left running on the machine would hold the GPU. Ending one subtree from inside
(a hung session, an overrunning pytest) therefore walks the tree rather than signalling a group.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["descendants", "end_tree", "signal_tree"]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields after the last ')' are fixed.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), ``pid`` itself excluded."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_tree(pid: int, sig: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_tree(pid: int, grace_s: float = 2.0) -> None:
    """SIGTERM to the tree (continued first, in case it was stopped), then SIGKILL to what is left."""
    tree = [pid, *descendants(pid)]
    for sig in (signal.SIGCONT, signal.SIGTERM):
        for p in tree:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (ended, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True
