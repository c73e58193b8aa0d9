"""Run untrusted Python (a candidate solution and its tests) in a fresh, confined process.

Never ``exec`` in the engine's process. Each execution is one ``harness`` process (see
:mod:`envs.sandbox_child`) started under the strongest isolation this machine allows:

``namespaces`` (root): ``unshare --net --pid --ipc --uts --mount --fork --kill-child --mount-proc``; the
harness is PID 1 of a fresh PID namespace, so when it ends (or the engine kills ``unshare``) the kernel
kills every process in the namespace, including children that called ``setsid`` or double-forked. Fresh
network namespace (loopback down: no network, not even 127.0.0.1). Private mounts: a size-capped tmpfs on
``/tmp`` is the work directory, the other world-writable directories are covered by empty read-only tmpfs.
cgroup (v1 or v2) with ``pids``, ``memory`` and ``cpu`` limits for the whole tree, emptied and removed
after. Candidates run as an unprivileged uid (one per worker slot: the kernel does not enforce
RLIMIT_NPROC for root), with no new privileges and no capabilities.

``user-namespaces`` (not root, unprivileged user namespaces allowed): the same namespaces inside a user
namespace; no uid change and no cgroup.

``process-group`` (neither available): a new session killed as a whole; rlimits only. A child that calls
``setsid`` can outlive the run and the network is reachable: :meth:`Sandbox.describe` says so.

In every mode: an empty environment, rlimits (CPU seconds, address space, file size, open files,
processes, no core files), wall-clock limits per test and per run, capped output, and verdicts read only
from per-test nonce markers that the harness writes after a test's code ran to its end (never from an exit
code). Results are cached by a hash of (code, tests, context, entry point, limits); :meth:`Sandbox.run_many`
runs executions in parallel on a pool of worker slots.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import marshal
import os
import queue
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from envs.sandbox_host import cgroup_layout, find_interpreter, sandbox_processes

__all__ = ["ExecResult", "Job", "Sandbox", "SandboxError", "SandboxLimits", "sandbox_processes"]

Isolation = Literal["auto", "namespaces", "user-namespaces", "process-group"]
CHILD_SOURCE = (Path(__file__).parent / "sandbox_child.py").read_text(encoding="utf-8")
UID_BASE = 2_100_000_000
"""Sandboxed processes run as uid/gid ``UID_BASE + slot`` (no passwd entry, owns no file)."""
HIDE_DIRS = ("/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue", "/var/crash")
"""World-writable directories covered by an empty read-only tmpfs (``/tmp`` becomes the work dir)."""


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a verdict on the candidate)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one execution (a candidate and all its tests)."""

    timeout_s: float = 10.0
    """Wall-clock limit for the whole execution."""
    test_timeout_s: float = 3.0
    """Wall-clock limit for one test (the candidate is restarted after a test that hit it)."""
    cpu_s: int = 5
    """CPU seconds per process (RLIMIT_CPU)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS) and memory of the whole tree (cgroup)."""
    disk_mb: int = 16
    """Size of the work directory (tmpfs) and largest file (RLIMIT_FSIZE)."""
    open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    processes: int = 32
    """Processes of the whole tree (cgroup pids.max and RLIMIT_NPROC of the sandbox uid)."""
    cpus: float = 1.0
    """CPU share of the whole tree (cgroup CPU quota; 0: no quota)."""
    output_bytes: int = 65_536
    """Bytes read back from the harness; more ends the run."""


@dataclass(frozen=True)
class Job:
    """One execution: ``code`` defines ``entry_point``; each test is run separately against it."""

    code: str
    """The candidate program (for HumanEval: prompt + completion), run in its own process."""
    tests: tuple[str, ...]
    """Test programs; each calls ``entry_point`` and raises (e.g. a failed assert) to fail."""
    entry_point: str
    """Name of the function under test; in the tests it is bound to a proxy of the candidate's."""
    context: str = ""
    """Trusted code run before each test in the test's namespace (imports, helper functions)."""


@dataclass(frozen=True)
class ExecResult:
    """The verdict on one job."""

    passed: tuple[bool, ...]
    """Per test: True only when the harness's nonce marker says the test ran to its end."""
    reasons: tuple[str, ...]
    """Per test: why it failed ("" when passed)."""
    status: Literal["ok", "timeout", "output-limit"]
    """ok: every test got a verdict; timeout / output-limit: the run was cut short (missing = failed)."""
    wall_s: float
    """Wall-clock seconds of the execution (0 when served from the cache)."""
    cached: bool = False
    """Whether the result came from the cache."""
    leftovers: int = 0
    """Processes of the run found alive after it ended (in its cgroup or under its uid), then killed."""

    @property
    def all_passed(self) -> bool:
        return bool(self.passed) and all(self.passed)


# -- the sandbox ----------------------------------------------------------------------------------------
class Sandbox:
    """A pool of confined workers that run :class:`Job` s and return :class:`ExecResult` s.

    ``isolation="auto"`` picks the strongest mechanism that passes a self-check on this machine
    (``namespaces``, then ``user-namespaces``, then ``process-group``); naming one that does not work
    raises :class:`SandboxError`. ``workers`` defaults to the number of CPUs.
    """

    def __init__(self, *, limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
                 isolation: Isolation = "auto", cache_size: int = 100_000):
        self.limits = limits
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.python = find_interpreter()
        self.unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
        self._cache: collections.OrderedDict[str, ExecResult] = collections.OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()
        self._slots: queue.Queue[int] = queue.Queue()
        for s in range(self.workers):
            self._slots.put(s)
        self._counter = 0
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        self.cgroups = cgroup_layout()
        self.stats = {"executions": 0, "cache_hits": 0}
        self._hide = tuple(d for d in HIDE_DIRS if os.path.isdir(d) and not os.path.islink(d))
        order = ["namespaces", "user-namespaces", "process-group"] if isolation == "auto" else [isolation]
        failures = []
        for mode in order:
            if mode == "namespaces" and (os.geteuid() != 0 or not self.unshare):
                failures.append("namespaces: needs root and util-linux unshare")
                continue
            if mode == "user-namespaces" and not self.unshare:
                failures.append("user-namespaces: needs util-linux unshare")
                continue
            self.isolation = mode
            problem = self._self_check()
            if problem is None:
                break
            failures.append(f"{mode}: {problem}")
        else:
            raise SandboxError("no sandbox mechanism works here: " + "; ".join(failures))
        self.unavailable = failures

    # -- public API -----------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Which mechanisms are in force, and the limits."""
        ns = self.isolation in ("namespaces", "user-namespaces")
        cg = self.cgroups if self.isolation == "namespaces" else {}
        return {
            "isolation": self.isolation,
            "namespaces": ["pid", "net", "mount", "ipc", "uts"] + (["user"] if self.isolation == "user-namespaces"
                                                                    else []) if ns else [],
            "kills_whole_tree": ("PID namespace (init exits: kernel kills all)" if ns
                                 else "process group only: a setsid child can escape"),
            "cgroup": (f"v{cg['version']} " + "+".join(k for k in ("pids", "memory", "cpu", "unified") if k in cg))
            if cg else None,
            "uid": f"{UID_BASE}+slot (unprivileged, no capabilities, no_new_privs)" if self.isolation == "namespaces"
            else f"{os.geteuid()} (unchanged)",
            "network": "none (fresh network namespace, loopback down)" if ns else "host network (not isolated)",
            "filesystem": (f"tmpfs work dir /tmp ({self.limits.disk_mb} MiB); read-only empty tmpfs over "
                           f"{', '.join(self._hide)}" if ns else "throwaway temp dir; rest of the filesystem as the "
                                                                 "user's permissions allow"),
            "environment": "empty",
            "verdict": "per-test nonce markers from a harness process the candidate never runs in",
            "interpreter": self.python,
            "workers": self.workers,
            "limits": dataclasses.asdict(self.limits),
            "unavailable": list(self.unavailable),
        }

    def uids(self) -> list[int]:
        """The uids sandboxed processes run as (empty unless isolation is ``namespaces``)."""
        return [UID_BASE + s for s in range(self.workers)] if self.isolation == "namespaces" else []

    def run(self, job: Job) -> ExecResult:
        """Run one job (or return its cached result)."""
        key = self._key(job)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return dataclasses.replace(hit, cached=True, wall_s=0.0)
        slot = self._slots.get()
        try:
            result = self._execute(job, slot)
        finally:
            self._slots.put(slot)
        with self._lock:
            self.stats["executions"] += 1
            self._cache[key] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def run_many(self, jobs: Sequence[Job], progress: Callable[[int, int], None] | None = None) -> list[ExecResult]:
        """Run ``jobs`` in parallel on the worker pool; results in the same order."""
        futures = [self._pool.submit(self.run, j) for j in jobs]
        out = []
        for i, f in enumerate(futures):
            out.append(f.result())
            if progress is not None:
                progress(i + 1, len(jobs))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals --------------------------------------------------------------------------------------
    def _key(self, job: Job) -> str:
        blob = json.dumps([job.code, list(job.tests), job.context, job.entry_point,
                           dataclasses.asdict(self.limits)])
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()

    def _self_check(self) -> str | None:
        job = Job("def f(x):\n    return x + 1\n", ("assert f(1) == 2", "assert f(1) == 3"), "f")
        try:
            r = self._execute(job, 0)
        except (OSError, SandboxError) as exc:
            return str(exc)
        if r.passed != (True, False):
            return f"self-check gave {r.passed} ({r.reasons})"
        return None

    def _argv(self) -> list[str]:
        child = [self.python, "-I", "-S", "-c", CHILD_SOURCE, "harness"]
        flags = ["--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc"]
        if self.isolation == "namespaces":
            return [self.unshare, *flags, *child]
        if self.isolation == "user-namespaces":
            return [self.unshare, "--user", "--map-root-user", *flags, *child]
        return child

    def _make_cgroup(self, slot: int) -> list[Path]:
        """Create this run's cgroup(s) with their limits; the directories to remove afterwards."""
        lim = self.limits
        with self._lock:
            self._counter += 1
            name = f"engine-sandbox-{os.getpid()}-{slot}-{self._counter}"
        made = []
        try:
            if self.cgroups.get("version") == 1:
                for ctrl in ("pids", "memory", "cpu"):
                    if ctrl not in self.cgroups:
                        continue
                    d = self.cgroups[ctrl] / name
                    d.mkdir()
                    made.append(d)
                    if ctrl == "pids":
                        (d / "pids.max").write_text(str(lim.processes))
                    elif ctrl == "memory":
                        (d / "memory.limit_in_bytes").write_text(str(lim.memory_mb << 20))
                        if (d / "memory.memsw.limit_in_bytes").exists():
                            (d / "memory.memsw.limit_in_bytes").write_text(str(lim.memory_mb << 20))
                    elif ctrl == "cpu" and lim.cpus > 0:
                        (d / "cpu.cfs_period_us").write_text("100000")
                        (d / "cpu.cfs_quota_us").write_text(str(int(lim.cpus * 100_000)))
            elif self.cgroups.get("version") == 2:
                d = self.cgroups["unified"] / name
                d.mkdir()
                made.append(d)
                (d / "pids.max").write_text(str(lim.processes))
                (d / "memory.max").write_text(str(lim.memory_mb << 20))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                if lim.cpus > 0 and (d / "cpu.max").exists():
                    (d / "cpu.max").write_text(f"{int(lim.cpus * 100_000)} 100000")
        except OSError:
            self._remove_cgroups(made)
            raise
        return made

    @staticmethod
    def _remove_cgroups(dirs: list[Path]) -> None:
        for d in dirs:
            for _ in range(50):
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    pids = []
                for p in pids:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)

    @staticmethod
    def _reap(cgroups: list[Path], uid: int | None) -> int:
        """Count and kill what outlived the run: members of its cgroups and processes of its uid."""
        pids: set[int] = set()
        for d in cgroups:
            try:
                pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        if uid is not None:
            pids.update(p for p, _, _ in sandbox_processes([uid]))
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def _nproc_limit(self) -> int:
        """RLIMIT_NPROC counts every process of the real uid: outside our own uid, allow for the ones
        the user already has."""
        if self.isolation == "namespaces":
            return self.limits.processes
        return len(sandbox_processes([os.getuid()])) + self.limits.processes

    def _execute(self, job: Job, slot: int) -> ExecResult:
        lim = self.limits
        t0 = time.monotonic()
        run_nonce = secrets.token_hex(16)
        nonces = [secrets.token_hex(16) for _ in job.tests]
        ns_root = self.isolation == "namespaces"
        payload = {
            "isolation": self.isolation, "run_nonce": run_nonce, "nonces": nonces, "code": job.code,
            "tests": list(job.tests), "context": job.context, "entry_point": job.entry_point,
            "child_source": CHILD_SOURCE, "disk_kb": lim.disk_mb * 1024, "hide_dirs": list(self._hide),
            "candidate_setsid": self.isolation != "process-group",
            "uid": UID_BASE + slot if ns_root else None, "gid": UID_BASE + slot if ns_root else None,
            "limits": {"timeout_s": lim.timeout_s, "test_timeout_s": lim.test_timeout_s, "cpu_s": lim.cpu_s,
                       "memory_bytes": lim.memory_mb << 20, "file_size_bytes": lim.disk_mb << 20,
                       "open_files": lim.open_files, "nproc": self._nproc_limit()},
        }
        cgroups = self._make_cgroup(slot) if ns_root and self.cgroups else []
        payload["cgroup_procs"] = [str(d / "cgroup.procs") for d in cgroups]
        workdir = None
        if self.isolation == "process-group":
            workdir = tempfile.mkdtemp(prefix="engine-sandbox-")
            payload["workdir"] = workdir
        try:
            proc = subprocess.Popen(self._argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={}, cwd="/", close_fds=True, start_new_session=True)
            out, err, status = self._communicate(proc, marshal.dumps(payload, 4),
                                                 deadline=t0 + lim.timeout_s + 2.0)
            leftovers = self._reap(cgroups, UID_BASE + slot if ns_root else None)
        finally:
            self._remove_cgroups(cgroups)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        lines = out.decode("utf-8", "replace").splitlines()
        if not any(line == f"{run_nonce} ready" for line in lines):
            setup = [line for line in lines if line.startswith(f"{run_nonce} setup-error")]
            detail = setup[0].split(" ", 1)[1] if setup else err.decode("utf-8", "replace").strip()[-800:]
            raise SandboxError(f"the sandbox did not start ({self.isolation}): {detail or f'exit {proc.returncode}'}")
        verdicts: dict[str, str] = {}
        for line in lines:
            head, _, rest = line.partition(" ")
            if head in verdicts:
                verdicts[head] = "fail duplicate marker"
            else:
                verdicts[head] = rest
        passed = tuple(verdicts.get(n) == "pass" for n in nonces)
        reasons = tuple("" if p else (verdicts.get(n, "fail no verdict (run cut short)").removeprefix("fail ").strip())
                        for p, n in zip(passed, nonces))
        if status == "ok" and any(n not in verdicts for n in nonces):
            status = "timeout"
        return ExecResult(passed, reasons, status, time.monotonic() - t0, leftovers=leftovers)

    def _communicate(self, proc: subprocess.Popen, payload: bytes, deadline: float) -> tuple[bytes, bytes, str]:
        """Send ``payload``, read stdout and stderr up to the output cap until exit or ``deadline``; the
        process group is killed in every case (stragglers of the process-group mode included)."""
        status = "ok"
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        bufs = {out_fd: bytearray(), err_fd: bytearray()}
        cap = self.limits.output_bytes + 200 * 1024
        with selectors.DefaultSelector() as sel:
            for fd in bufs:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            open_fds = len(bufs)
            while open_fds:
                left = deadline - time.monotonic()
                if left <= 0:
                    status = "timeout"
                    break
                for key, _ in sel.select(min(left, 1.0)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        open_fds -= 1
                        continue
                    bufs[key.fd] += chunk
                    if sum(len(b) for b in bufs.values()) > cap:
                        status = "output-limit"
                        open_fds = 0
                        break
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        return bytes(bufs[out_fd]), bytes(bufs[err_fd]), status
