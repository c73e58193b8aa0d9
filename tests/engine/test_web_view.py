"""`engine view`: a real HTTP server on localhost over a run directory, its pages read back with
urllib, the standard HTML parser and a real headless Chromium."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from engine.errors import UsageError
from engine.view import make_server
from search import Tree, extract_pairs, tree_to_dict

ROOT = Path(__file__).resolve().parents[2]


TASKS = ["t0", "t<i>1</i>"]  # markup in a task id stays text


def make_run(path: Path) -> Path:
    """A run directory with two searched iterations: 2 hand-built trees each (task ids t0, t1;
    a step text that is markup), and iteration 1's pairs."""
    tree = Tree(2)
    for b, task in enumerate(TASKS):
        tree.meta[b] = {"task_id": task, "prompt": "2+3\n"}
        a, c = tree.add_children(b, 0, ["a\n", "<img src=x onerror=alert(1)>\n"], [0.6, 0.4], [0.0] * 2, [False] * 2)
        d, e = tree.add_children(b, a, ["d\n", "e\n"], [0.5, 0.5], [1.0, 0.0], [True, True])
        for node, n, q in [(0, 5, 0.4), (a, 3, 2 / 3), (c, 2, 0.0), (d, 2, 1.0), (e, 1, 0.0)]:
            tree.visits[b, node], tree.value_sum[b, node] = n, n * q
    for it in (1, 2):
        (path / f"iter_{it:03d}").mkdir(parents=True)
        (path / f"iter_{it:03d}" / "trees.json").write_text(json.dumps([tree_to_dict(tree, b) for b in range(2)]))
    pairs = extract_pairs(tree, prompts=["2+3\n"] * 2, task_ids=TASKS, min_q_gap=0.5)
    (path / "iter_001" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (path / "config.json").write_text(json.dumps({"min_q_gap": 0.5}))
    return path


@pytest.fixture()
def served(tmp_path):
    server = make_server(make_run(tmp_path / "run"), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8")


class Links(HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.links, self.tags = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "a":
            self.links.append(dict(attrs)["href"])


def test_pages_link_the_run_its_iterations_and_trees(served):
    status, index = get(served + "/")
    assert status == 200 and "iteration 1</a>: 2 trees, 10 nodes" in index and "; 4 pairs extracted" in index
    assert [link for link in Links(index).links if link.startswith("/iteration")] == ["/iteration/1", "/iteration/2"]
    status, table = get(served + "/iteration/1")
    assert status == 200 and Links(table).links[-2:] == ["/iteration/1/tree/0", "/iteration/1/tree/1"]
    assert table.count("<tr>") == 3  # a header and a row per tree
    assert "<i>" not in table and "t&lt;i&gt;1&lt;/i&gt;" in table
    status, page = get(served + "/iteration/1/tree/1")
    assert status == 200 and "2 pairs extracted from this tree" in page
    assert '<span class="chosen">▲1</span>' in page and '<span class="rejected">▼1</span>' in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "/iteration/1/tree/0" in Links(page).links and "img" not in Links(page).tags
    status, page = get(served + "/iteration/2/tree/0")
    assert status == 200 and "▲" not in page  # iteration 2 has no pairs yet


@pytest.mark.parametrize("path, needle", [
    ("/iteration/3", "iteration 3 has no search trees"), ("/iteration/1/tree/2", "no tree 2"),
    ("/iteration/1/tree/x", "no page"), ("/../../etc/passwd", "no page"), ("/trees.json", "no page"),
    ("/iteration/" + "9" * 5000, "no page"), ("/iteration/%D9%A1", "no page"),  # a huge number; a non-ASCII digit
])
def test_anything_else_is_a_404_that_says_why(served, path, needle):
    status, page = get(served + path)
    assert status == 404 and needle in page and "<a href=\"/\">" in page


def test_one_unreadable_iteration_leaves_the_others_listed_and_head_requests_work(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "iter_002" / "trees.json").write_text('{"x": 1}')
    server = make_server(run, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, index = get(url + "/")
        assert status == 200 and "iteration 1</a>: 2 trees" in index and "does not hold search trees" in index
        assert get(url + "/iteration/2")[0] == 404 and get(url + "/iteration/1/tree/1")[0] == 200
        head = urllib.request.Request(url + "/iteration/1", method="HEAD")
        with urllib.request.urlopen(head, timeout=30) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) > 1000 and r.read() == b""
    finally:
        server.shutdown()
        server.server_close()


def test_a_directory_without_trees_is_refused_before_listening(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no search trees yet"):
        make_server(tmp_path / "empty", port=0)


def test_the_command_serves_until_interrupted(tmp_path):
    run = make_run(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "view", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(60, proc.kill)  # a server that never says where it is fails the test
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving the search trees of {run} at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert get(url + "iteration/2")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        proc.kill()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for port, needle in [(busy.getsockname()[1], "cannot listen there"), (-5, "--port must be in 0..65535")]:
            taken = subprocess.run([sys.executable, "-m", "engine.cli", "view", str(run), "--port", str(port)],
                                   capture_output=True, text=True, env=env, timeout=60)
            assert taken.returncode == 2 and needle in taken.stderr, taken.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium; .ci/run does)")
def test_a_real_browser_renders_the_tree_page(served, tmp_path):
    """Headless Chromium loads the page from the server and dumps the document it built: every
    node's element is there, the principal variation open, and the markup in a step stays text."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", served + "/iteration/1/tree/1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert dom.count("<li") == 5 and dom.count("<details open") == 2  # the root and a, on the path
    assert "<img" not in dom and "&lt;img src=x onerror=alert(1)&gt;" in dom
    assert '<span class="chosen">▲1</span>' in dom
