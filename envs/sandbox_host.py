"""What the sandbox finds on its host: an interpreter any uid can run, the cgroups it may create
children under, and the live processes of given uids."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cgroup_layout", "find_interpreter", "sandbox_processes"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _world_accessible(path: str) -> bool:
    """Whether any user can execute ``path`` (every ancestor searchable, the file readable+executable)."""
    p = Path(path)
    try:
        if (p.stat().st_mode & 0o005) != 0o005:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in p.parents)
    except OSError:
        return False


def find_interpreter() -> str:
    """A Python 3 interpreter that an unprivileged uid can run (the venv's may sit under /root)."""
    import sys

    candidates = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
                  shutil.which("python3") or "", "/usr/bin/python3", "/usr/local/bin/python3"]
    for c in candidates:
        if c and os.path.isfile(c) and _world_accessible(os.path.realpath(c)):
            return os.path.realpath(c)
    return os.path.realpath(sys.executable)


def cgroup_layout() -> dict:
    """Writable cgroup parents for our own cgroup: {"version": 1|2, controller: parent dir}."""
    if os.geteuid() != 0:
        return {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}
    own: dict[str, str] = {}
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            own[c] = path
    v1 = {}
    for c in ("pids", "memory", "cpu"):
        base = CGROUP_ROOT / c
        if c in own and (base / "cgroup.procs").is_file():
            parent = base / own[c].lstrip("/")
            if os.access(parent, os.W_OK):
                v1[c] = parent
    if "pids" in v1 and "memory" in v1:
        return {"version": 1, **v1}
    if "" in own and (CGROUP_ROOT / "cgroup.controllers").is_file():
        parent = CGROUP_ROOT / own[""].lstrip("/")
        try:
            enabled = (parent / "cgroup.subtree_control").read_text().split()
        except OSError:
            enabled = []
        if {"pids", "memory"} <= set(enabled) and os.access(parent, os.W_OK):
            return {"version": 2, "unified": parent}
    return {}


def sandbox_processes(uids: Sequence[int]) -> list[tuple[int, int, str]]:
    """(pid, uid, command) of every live process whose real uid is in ``uids`` (scans /proc)."""
    wanted, out = set(uids), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            uid = int(fields.get("Uid", "-1").split()[0])
        except ValueError:
            continue
        state = fields.get("State", "").strip()
        if uid in wanted and not state.startswith("Z"):
            out.append((int(entry), uid, fields.get("Name", "").strip()))
    return out
