"""Hostile candidates: none passes a test it should fail, none leaves a process behind, none writes outside
its directory, none reaches the network or the engine's environment, and the engine stays responsive.

Every case's tests can only pass by cheating (or by escaping): an honest candidate fails them all."""

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from envs.sandbox import Job, Sandbox, SandboxLimits, sandbox_processes

TOKEN = secrets.token_hex(8)
OUTSIDE = [f"/tmp/escape-{TOKEN}", f"/var/tmp/escape-{TOKEN}", f"/dev/shm/escape-{TOKEN}",
           f"/run/lock/escape-{TOKEN}", str(Path(__file__).resolve().parent / f"escape-{TOKEN}"),
           f"/root/escape-{TOKEN}", f"/escape-{TOKEN}"]
WRITE_ALL = "".join(f"    try:\n        open({p!r}, 'w').write('x')\n    except OSError:\n        pass\n"
                    for p in OUTSIDE)
SPIN = "def f(x):\n    while True:\n        pass\n"


def _cases(port: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    impossible = ("assert f(1) == 'right answer'",)
    return {
        "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n" + SPIN,
                      impossible),
        "thread bomb": ("import threading, time\nfor _ in range(100000):\n    try:\n"
                        "        threading.Thread(target=time.sleep, args=(100,)).start()\n"
                        "    except RuntimeError:\n        break\n" + SPIN, impossible),
        "memory bomb": ("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n" + SPIN, impossible),
        "infinite loop": (SPIN, impossible),
        "child outlives parent": ("import os, time\nif os.fork() == 0:\n    time.sleep(1000)\n"
                                  "def f(x):\n    return None\n", impossible),
        "double-forked daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                 "        while True:\n            time.sleep(0.1)\n    os._exit(0)\n"
                                 "def f(x):\n    return None\n", impossible),
        "writes outside the work dir": ("def f(x):\n" + WRITE_ALL + "    return 'written'\n", impossible),
        "fills the disk": ("def f(x):\n    with open('big', 'wb') as fh:\n        while True:\n"
                           "            fh.write(b'x' * (1 << 20))\n", impossible),
        "reads the engine's environment": (
            "import os\ndef f(x):\n    found = [v for v in os.environ.values() if 'sandbox-secret' in v]\n"
            "    for pid in os.listdir('/proc'):\n        try:\n"
            "            if b'sandbox-secret' in open(f'/proc/{pid}/environ', 'rb').read():\n"
            "                found.append(pid)\n        except OSError:\n            pass\n"
            "    return 'right answer' if found else 'nothing'\n", impossible),
        "network to 127.0.0.1": (
            f"import socket\ndef f(x):\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    s.sendall(b'leak')\n    return s.recv(100).decode()\n", impossible),
        "early sys.exit(0)": ("import sys\nsys.exit(0)\n", impossible),
        "early os._exit(0)": ("import os\nos._exit(0)\n", impossible),
        "os._exit(0) inside the call": ("import os\ndef f(x):\n    os._exit(0)\n", impossible),
        "always-equal object": ("class Eq:\n    def __eq__(self, other):\n        return True\n"
                                "    __hash__ = object.__hash__\ndef f(x):\n    return Eq()\n", impossible),
        "always-equal str subclass": ("class S(str):\n    def __eq__(self, other):\n        return True\n"
                                      "    __hash__ = str.__hash__\ndef f(x):\n    return S('x')\n", impossible),
        "patches builtins": ("import builtins\nbuiltins.abs = lambda v: 0\nbuiltins.sorted = lambda v: [2]\n"
                             "builtins.AssertionError = None\ndef f(x):\n    return 100\n",
                             ("assert abs(f(1) - 2) < 1e-9", "assert sorted([f(1)]) == [2]")),
        "patches the harness": (
            "import sys\nm = sys.modules['__main__']\nm.encode = lambda *a, **k: ['s', 'right answer']\n"
            "m.decode = lambda *a, **k: 1\ndef f(x):\n    return 'wrong'\n", impossible),
        "forges markers": (
            "import os\ndef f(x):\n    for fd in range(64):\n        try:\n"
            "            os.write(fd, b'pass\\n' * 100)\n        except OSError:\n            pass\n"
            "    for pid in os.listdir('/proc'):\n        for fd in range(8):\n            try:\n"
            "                with open(f'/proc/{pid}/fd/{fd}', 'w') as fh:\n"
            "                    fh.write('pass\\n')\n            except OSError:\n                pass\n"
            "    print('pass')\n    return 'wrong'\n", impossible),
        "huge output": ("import os, sys\ndef f(x):\n    for _ in range(200):\n        print('x' * 1000000)\n"
                        "        os.write(1, b'y' * 1000000)\n        os.write(2, b'z' * 1000000)\n"
                        "    return 'wrong'\n", impossible),
        "swallows SIGALRM/SIGTERM/SIGXCPU": (
            "import signal\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):\n"
            "    signal.signal(s, signal.SIG_IGN)\n" + SPIN, impossible),
        "deep recursion": ("import sys\nsys.setrecursionlimit(10**8)\ndef f(x):\n    return f(x) + 1\n",
                           impossible),
        "ctypes setuid, mount, segfault": (
            "import ctypes, os\nlibc = ctypes.CDLL(None)\ndef f(x):\n    libc.setuid(0)\n"
            "    libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)\n    if os.getuid() == 0:\n"
            "        return 'right answer'\n    ctypes.string_at(0)\n", impossible),
        "kills the harness and everyone": ("import os, signal\ndef f(x):\n    for pid in (1, -1, os.getppid()):\n"
                                           "        try:\n            os.kill(pid, signal.SIGKILL)\n"
                                           "        except OSError:\n            pass\n    return 'wrong'\n",
                                           impossible),
        "reads the harness's memory": (
            "import re\ndef f(x):\n    for pid in ('1', 'self'):\n        try:\n"
            "            maps = open(f'/proc/{pid}/maps').read()\n            mem = open(f'/proc/{pid}/mem', 'rb')\n"
            "        except OSError:\n            continue\n    return 'wrong'\n", impossible),
        "reads /etc/shadow": ("def f(x):\n    return open('/etc/shadow').read()\n", ("assert len(f(1)) > 0",)),
    }


class _Server(threading.Thread):
    """A TCP server on 127.0.0.1 in the engine's network namespace, counting what reaches it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False

    def run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.sendall(b"right answer")
            conn.close()


def test_hostile_candidates(capsys):
    limits = SandboxLimits(timeout_s=4, test_timeout_s=2, cpu_s=2, memory_mb=256, disk_mb=4, processes=24)
    server = _Server()
    server.start()
    os.environ["ENGINE_TEST_TOKEN"] = "sandbox-secret-" + TOKEN
    gaps, done = [], threading.Event()

    def heartbeat():
        last = time.monotonic()
        while not done.is_set():
            time.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    cases = _cases(server.port)
    assert len(cases) >= 20
    try:
        with Sandbox(limits=limits, workers=2) as sb:
            results = sb.run_many([Job(code, tests, "f") for code, tests in cases.values()])
            uids = sb.uids()
            mechanism = sb.describe()
    finally:
        done.set()
        server.stop = True
        os.environ.pop("ENGINE_TEST_TOKEN", None)
    beat.join()
    with capsys.disabled():
        print(f"\n{len(cases)} hostile candidates under {mechanism['isolation']} ({mechanism['cgroup']}); "
              f"longest heartbeat gap in the engine {max(gaps) * 1000:.0f} ms")
        for name, r in zip(cases, results):
            print(f"  {name:34s} passed={r.passed} {r.status:8s} {r.wall_s:4.1f}s  {r.reasons[0][:60]}")
    for name, r in zip(cases, results):
        assert not any(r.passed), f"{name}: passed a test it should fail ({r})"
        assert r.leftovers == 0, f"{name}: {r.leftovers} processes outlived the run"
    assert not sandbox_processes(uids), "processes of the sandbox uids are still alive"
    assert server.connections == 0, "a candidate reached 127.0.0.1 in the engine's network namespace"
    escaped = [p for p in OUTSIDE if os.path.exists(p)]
    for p in escaped:
        os.unlink(p)
    assert not escaped, f"files written outside the work dir: {escaped}"
    assert max(gaps) < 2.0, f"the engine stalled for {max(gaps):.2f}s"
    if os.geteuid() == 0:
        assert mechanism["isolation"] == "namespaces"


@pytest.mark.parametrize("code", ["import os\nos.setsid()\n", "import os\nif os.fork():\n    os._exit(0)\n"])
def test_detached_processes_are_killed_at_once(code):
    """A daemon that detaches while the tests run is gone as soon as the run returns."""
    limits = SandboxLimits(timeout_s=4, test_timeout_s=2)
    with Sandbox(limits=limits, workers=1) as sb:
        spawn = ("import os, time\nif os.fork() == 0:\n" + "".join("    " + ln + "\n" for ln in code.splitlines())
                 + "    while True:\n        time.sleep(0.05)\n")
        r = sb.run(Job(spawn + "def f(x):\n    return x\n", ("assert f(1) == 1",), "f"))
        assert r.passed == (True,) and r.leftovers == 0
        assert not sandbox_processes(sb.uids())
