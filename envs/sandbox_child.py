"""The two programs that run inside the sandbox (standard library only, never imported by the engine).

``harness``: reads one job (marshal) on stdin, sets up the sandbox from the inside (private mounts, cgroup
membership, an unprivileged uid, resource limits), then runs every test in a forked child of its own.
The candidate's code never runs in the harness: it runs in a separate ``candidate`` process, and the test
code calls it through a proxy that ships arguments and return values as plain data (builtin types only,
rebuilt on the harness side). So a candidate can neither patch the harness or the builtins the asserts use,
nor return an object whose ``__eq__`` is always true, nor report success by exiting early: the harness
writes ``<nonce> pass`` for test *i* only after that test's code ran to its end, on a descriptor the
candidate never holds, with a per-test nonce it never sees.

Run as ``python -I -S -c <this source> harness|candidate``.
"""

import marshal
import os
import select
import sys
import time

MAX_MESSAGE = 4 << 20  # bytes in one protocol line
MAX_DEPTH = 64
MAX_ITEMS = 1 << 20
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
SIGKILL = 9
FORBIDDEN_EXCEPTIONS = ("SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException")


# -- value codec: builtin data only, by exact type --------------------------------------------------
def encode(v, depth=0, count=None):
    count = count if count is not None else [0]
    count[0] += 1
    if depth > MAX_DEPTH or count[0] > MAX_ITEMS:
        raise ValueError("value too deep or too large to return")
    t = type(v)
    if v is None:
        return ["n"]
    if t is bool:
        return ["B", v]
    if t is int:
        return ["i", hex(v)]
    if t is float:
        return ["f", v.hex()]
    if t is complex:
        return ["c", v.real.hex(), v.imag.hex()]
    if t is str:
        return ["s", v]
    if t is bytes:
        return ["b", v.hex()]
    if t in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
        return [tag, [encode(x, depth + 1, count) for x in v]]
    if t is dict:
        return ["d", [[encode(k, depth + 1, count), encode(x, depth + 1, count)] for k, x in v.items()]]
    raise TypeError(f"returned an instance of {t.__name__}; only builtin data values can be returned")


def decode(e, depth=0):
    if depth > MAX_DEPTH or type(e) is not list or not e or type(e[0]) is not str:
        raise ValueError("malformed value")
    tag = e[0]
    if tag == "n":
        return None
    if tag == "B" and type(e[1]) is bool:
        return e[1]
    if tag == "i" and type(e[1]) is str:
        return int(e[1], 16)
    if tag == "f" and type(e[1]) is str:
        return float.fromhex(e[1])
    if tag == "c":
        return complex(float.fromhex(e[1]), float.fromhex(e[2]))
    if tag == "s" and type(e[1]) is str:
        return e[1]
    if tag == "b" and type(e[1]) is str:
        return bytes.fromhex(e[1])
    if tag in ("l", "t", "S", "F") and type(e[1]) is list:
        items = [decode(x, depth + 1) for x in e[1]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and type(e[1]) is list:
        return {decode(k, depth + 1): decode(x, depth + 1) for k, x in e[1]}
    raise ValueError("malformed value")


# -- line protocol over pipes -----------------------------------------------------------------------
class Channel:
    """Length-prefixed ``marshal`` messages (plain lists and strings only) over two descriptors, with a
    deadline and a size cap. marshal needs no import: the sandbox's start-up stays short."""

    def __init__(self, rfd, wfd):
        self.rfd, self.wfd, self.buf = rfd, wfd, b""

    def send(self, obj):
        data = marshal.dumps(obj, 4)
        view = memoryview(len(data).to_bytes(4, "big") + data)
        while view:
            view = view[os.write(self.wfd, view):]

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer in time")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise EOFError("the candidate process ended")
            self.buf += chunk

    def recv(self, deadline):
        self._fill(4, deadline)
        n = int.from_bytes(self.buf[:4], "big")
        if n > MAX_MESSAGE:
            raise ValueError("message too large")
        self._fill(4 + n, deadline)
        data, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return marshal.loads(data)


# -- the candidate process ---------------------------------------------------------------------------
class _Capped:
    """A write-only text sink that keeps at most ``cap`` characters (candidate prints go here)."""

    def __init__(self, cap):
        self.cap, self.n = cap, 0

    def write(self, s):
        self.n += len(s)
        return len(s)

    def flush(self):
        pass


def candidate_main():
    proto = Channel(os.dup(0), os.dup(1))
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    sys.stdin = None
    sys.stdout = sys.stderr = _Capped(1 << 16)
    job = proto.recv(time.monotonic() + 60)
    ns = {"__name__": "__candidate__"}
    try:
        exec(compile(job["code"], "<candidate>", "exec"), ns)
        fn = ns[job["entry_point"]]
        if not callable(fn):
            raise TypeError(f"{job['entry_point']} is not a function")
    except BaseException as exc:  # noqa: BLE001 - any failure to load is reported, never raised
        proto.send({"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        return
    proto.send({"ready": True})
    while True:
        try:
            msg = proto.recv(time.monotonic() + 86_400)
        except (EOFError, TimeoutError):
            return
        try:
            args, kwargs = decode(msg["a"]), decode(msg["k"])
            value = fn(*args, **kwargs)
            reply = {"value": encode(value)}
        except BaseException as exc:  # noqa: BLE001 - SystemExit inside the call is a failure too
            reply = {"raise": type(exc).__name__, "msg": str(exc)[:200] if type(exc).__str__ is BaseException.__str__
                     else ""}
        proto.send(reply)


# -- the harness ---------------------------------------------------------------------------------------
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(libc, target, options, flags):
    import ctypes

    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", flags, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def _setup(job):
    """Everything done before the first test: cgroups, mounts, uid, limits. Returns the work dir."""
    import resource

    iso = job["isolation"]
    for procs in job.get("cgroup_procs", []):
        with open(procs, "w") as fh:
            fh.write(str(os.getpid()))
    libc = _libc() if iso in ("namespaces", "user-namespaces") else None
    uid, gid = job.get("uid"), job.get("gid")
    if libc is not None:
        owner = f",uid={uid},gid={gid}" if uid is not None else ""
        _mount_tmpfs(libc, "/tmp", f"size={job['disk_kb']}k,nr_inodes=4096,mode=0700{owner}", MS_NOSUID | MS_NODEV)
        for path in job.get("hide_dirs", []):
            if os.path.isdir(path):
                _mount_tmpfs(libc, path, "size=4k,nr_inodes=16,mode=0755", MS_NOSUID | MS_NODEV | MS_RDONLY)
        workdir = "/tmp"
        try:
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write("-500")
        except OSError:
            pass
    else:
        workdir = job["workdir"]
    os.chdir(workdir)
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    lim = job["limits"]
    for name, value in (("RLIMIT_NPROC", lim["nproc"]), ("RLIMIT_NOFILE", lim["open_files"]),
                        ("RLIMIT_FSIZE", lim["file_size_bytes"]), ("RLIMIT_CORE", 0),
                        ("RLIMIT_AS", lim["memory_bytes"])):
        resource.setrlimit(getattr(resource, name), (value, value))
    lib = libc or _libc()
    lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    lib.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # same-uid processes cannot ptrace us or open /proc/<pid>/fd|mem
    os.nice(job.get("nice", 10))
    return workdir


class Candidate:
    """The candidate's process, spawned on first use and again after it dies or hangs."""

    def __init__(self, job, workdir):
        self.job, self.workdir, self.pid, self.fds, self.chan, self.load_error = job, workdir, None, (), None, None

    def ensure(self, deadline):
        if self.pid is not None and self.alive():
            return
        self.kill()
        from_parent, to_child = os.pipe()
        from_child, to_parent = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                import resource

                os.dup2(from_parent, 0)
                os.dup2(to_parent, 1)
                os.dup2(os.open(os.devnull, os.O_RDWR), 2)
                os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                if self.job.get("candidate_setsid"):
                    os.setsid()
                cpu = self.job["limits"]["cpu_s"]
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
                try:
                    with open("/proc/self/oom_score_adj", "w") as fh:
                        fh.write("1000")
                except OSError:
                    pass
                os.execve(sys.executable, [sys.executable, "-I", "-S", "-c", self.job["child_source"], "candidate"],
                          {})
            finally:
                os._exit(127)
        os.close(from_parent)
        os.close(to_parent)
        self.pid, self.fds = pid, (from_child, to_child)
        self.chan = Channel(from_child, to_child)
        self.chan.send({"code": self.job["code"], "entry_point": self.job["entry_point"]})
        reply = self.chan.recv(deadline)
        if "error" in reply:
            self.load_error = reply["error"]

    def alive(self):
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def kill(self):
        if self.pid is not None:
            for kill in (os.killpg, os.kill):
                try:
                    kill(self.pid, SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            for fd in self.fds:
                os.close(fd)
            self.pid = None


def _builtin_exception(name):
    import builtins

    cls = getattr(builtins, name, None) if name not in FORBIDDEN_EXCEPTIONS else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return RuntimeError


def _run_test(job, chan, source, deadline, report_fd):
    """In a forked child: run the task's context code and one test with the entry point bound to a proxy."""
    def proxy(*args, **kwargs):
        chan.send({"a": encode(list(args)), "k": encode(kwargs)})
        reply = chan.recv(deadline)
        if "value" in reply:
            return decode(reply["value"])
        raise _builtin_exception(str(reply.get("raise")))(f"candidate raised {reply.get('raise')}: "
                                                          f"{reply.get('msg', '')}")

    ns = {"__name__": "__test__"}
    try:
        if job.get("context"):
            exec(compile(job["context"], "<context>", "exec"), ns)
        ns[job["entry_point"]] = proxy
        exec(compile(source, "<test>", "exec"), ns)
        verdict = "ok"
    except BaseException as exc:  # noqa: BLE001
        verdict = f"{type(exc).__name__}: {str(exc)[:160]}"
    os.write(report_fd, verdict.encode("utf-8", "replace")[:400])


def harness_main():
    job = marshal.loads(sys.stdin.buffer.read())
    markers = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    try:
        workdir = _setup(job)
    except Exception as exc:  # noqa: BLE001
        os.write(markers, f"{job['run_nonce']} setup-error {type(exc).__name__}: {exc}\n".encode())
        raise SystemExit(3) from None
    os.write(markers, f"{job['run_nonce']} ready\n".encode())
    lim = job["limits"]
    start = time.monotonic()
    cand = Candidate(job, workdir)
    for i, (source, nonce) in enumerate(zip(job["tests"], job["nonces"])):
        deadline = min(time.monotonic() + lim["test_timeout_s"], start + lim["timeout_s"])
        try:
            cand.ensure(deadline)
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            cand.kill()
            os.write(markers, f"{nonce} fail candidate did not start ({type(exc).__name__}: {exc})\n".encode())
            continue
        if cand.load_error:
            for n in job["nonces"][i:]:
                os.write(markers, f"{n} fail {cand.load_error}\n".encode("utf-8", "replace")[:400])
            break
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the test child: no marker descriptor, output discarded, its own CPU limit
            try:
                import resource

                os.close(rfd)
                os.close(markers)
                os.dup2(devnull, 2)
                resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
                sys.stdout = sys.stderr = _Capped(1 << 16)
                _run_test(job, cand.chan, source, deadline, wfd)
            finally:
                os._exit(0)
        os.close(wfd)
        verdict, timed_out = b"", False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 4096)
                if not chunk:
                    break
                verdict += chunk
        os.close(rfd)
        if timed_out:
            os.kill(pid, SIGKILL)
        os.waitpid(pid, 0)
        text = verdict.decode("utf-8", "replace").replace("\n", " ")
        if not timed_out and text == "ok":
            os.write(markers, f"{nonce} pass\n".encode())
        else:
            reason = "timeout" if timed_out else (text or "test process died")
            os.write(markers, f"{nonce} fail {reason}\n".encode("utf-8", "replace")[:400])
            if timed_out or cand.pid is None or not cand.alive():
                cand.kill()
            elif "TimeoutError" in text or "EOFError" in text or "message" in text:
                cand.kill()  # the protocol may be out of step: start afresh for the next test
    cand.kill()
    os.write(markers, f"{job['run_nonce']} done\n".encode())


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "harness":
        harness_main()
    elif role == "candidate":
        candidate_main()
    else:
        raise SystemExit("usage: python -I -S -c <source> harness|candidate")
