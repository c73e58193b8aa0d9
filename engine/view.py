"""``engine view``: a run's search trees as web pages, served from this machine.

    engine view runs/NAME [--host 127.0.0.1] [--port 8765]

Pages (read from the run directory at each request, so a run in progress shows its latest trees):

    /                          the run: its iterations with trees, one summary line each
    /iteration/N               iteration N's trees in a table, each linking to its page
    /iteration/N/tree/B        tree B node by node (search.tree_html: open and close any node),
                               its steps marked where the iteration's pairs chose or rejected them

Every page is one self-contained HTML document (no scripts, no external files); every text from the
run is HTML-escaped. Only this machine can connect unless ``--host`` says otherwise.
"""

from __future__ import annotations

import html
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit

import tyro

from engine.errors import UsageError

__all__ = ["ViewArgs", "make_server", "view"]


@dataclass(frozen=True)
class ViewArgs:
    """Serve a run's search trees as web pages: iterations, tables of trees, each tree node by node."""

    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """The run directory (runs/NAME)."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = 8765
    """Port to listen on (0: any free one)."""


_ROUTES = [(re.compile(r"/"), "index"), (re.compile(r"/iteration/([0-9]{1,9})"), "iteration"),
           (re.compile(r"/iteration/([0-9]{1,9})/tree/([0-9]{1,9})"), "tree")]


class _Pages:
    """The pages of one run directory. Each iteration's trees are parsed once per version of its
    trees.json (size and modification time)."""

    def __init__(self, run: Path):
        self.run = run
        self._cache: dict[int, tuple[tuple, object]] = {}
        self._lock = threading.Lock()

    def trees(self, iteration: int):
        from engine.show import _load

        file = self.run / f"iter_{iteration:03d}" / "trees.json"
        stat = file.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(iteration)
            if hit is None or hit[0] != key:
                self._cache[iteration] = (key, _load(self.run, iteration)[0])
            return self._cache[iteration][1]

    def page(self, path: str) -> tuple[int, str]:
        """(HTTP status, HTML document) for ``path``."""
        from engine.show import searched_iterations
        from search import html_page

        for pattern, name in _ROUTES:
            m = pattern.fullmatch(path.rstrip("/") or "/")
            if m is None:
                continue
            numbers = [int(g) for g in m.groups()]
            if numbers and numbers[0] not in searched_iterations(self.run):
                return 404, self._error(f"iteration {numbers[0]} has no search trees in {self.run}")
            try:
                title, body = getattr(self, f"_{name}")(*numbers)
            except UsageError as exc:
                return 404, self._error(str(exc))
            except LookupError as exc:
                return 404, self._error(str(exc.args[0]) if exc.args else "not found")
            except Exception as exc:  # noqa: BLE001 (a page that fails says so; the server goes on)
                return 500, self._error(f"could not build this page ({type(exc).__name__}: {exc})")
            return 200, html_page(title, self._nav(numbers) + body)
        return 404, self._error(f"no page {path}: see the run's pages from /")

    def _error(self, message: str) -> str:
        from search import html_page

        return html_page("not found", f'{self._nav([])}<p class="st-error">{html.escape(message)}</p>')

    def _nav(self, numbers: list[int]) -> str:
        links = [f'<a href="/">{html.escape(self.run.name)}</a>']
        if numbers:
            links.append(f'<a href="/iteration/{numbers[0]}">iteration {numbers[0]}</a>')
        if len(numbers) > 1:
            links.append(f"tree {numbers[1]}")
        return f'<nav style="margin-bottom:.8em">{" › ".join(links)}</nav>'

    def _index(self) -> tuple[str, str]:
        from engine.show import _load, load_pairs, searched_iterations, summary_line

        rows = []
        for it in searched_iterations(self.run):
            try:
                pairs, _ = load_pairs(self.run, it)
                line = summary_line(self.trees(it), self.run, it, pairs).split(": ", 1)[1]
            except UsageError as exc:  # the other iterations still show
                line = str(exc)
            rows.append(f'<li><a href="/iteration/{it}">iteration {it}</a>: {html.escape(line)}</li>')
        if not rows:  # the trees went away while serving: say what the directory holds now
            _load(self.run, None)
        return f"{self.run.name}: search trees", f"<h2>{html.escape(str(self.run))}</h2><ul>{''.join(rows)}</ul>"

    def _iteration(self, it: int) -> tuple[str, str]:
        from engine.show import COLUMNS_NOTE, load_pairs, summary_line, tree_rows

        tree = self.trees(it)
        pairs, problem = load_pairs(self.run, it)
        rows = tree_rows(tree, pairs, tree.batch_size)
        head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
        body = []
        for row in rows:
            cells = [f'<td><a href="/iteration/{it}/tree/{row["#"]}">{row["#"]}</a></td>']
            cells += [f"<td>{html.escape(str(v))}</td>" for k, v in row.items() if k != "#"]
            body.append(f"<tr>{''.join(cells)}</tr>")
        note = f"<p>{html.escape(problem)}</p>" if problem else ""
        return (f"{self.run.name}: iteration {it}",
                f"<p>{html.escape(summary_line(tree, self.run, it, pairs))}</p>{note}"
                f'<table class="st-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
                f"<p><small>{html.escape(COLUMNS_NOTE)}</small></p>")

    def _tree(self, it: int, b: int) -> tuple[str, str]:
        from engine.show import _pair_marks, load_pairs, pair_notes
        from search import tree_html

        tree = self.trees(it)
        if not 0 <= b < tree.batch_size:
            raise LookupError(f"iteration {it} has {tree.batch_size} trees (0..{tree.batch_size - 1}); no tree {b}")
        pairs, problem = load_pairs(self.run, it)
        marks, found = _pair_marks(tree, b, pairs) if pairs else ({}, 0)
        around = " · ".join(f'<a href="/iteration/{it}/tree/{k}">{label}</a>' for k, label in
                            ((b - 1, "previous tree"), (b + 1, "next tree")) if 0 <= k < tree.batch_size)
        notes = "".join(f"<p>{html.escape(t)}.</p>" for t in (problem, *pair_notes(tree, b, pairs, found)) if t)
        return (f"{self.run.name}: iteration {it}, tree {b}",
                f"<p>{around}</p>{notes}{tree_html(tree, b, marks=marks)}")


def make_server(run: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for the pages of run directory ``run``."""
    from engine.show import _load, searched_iterations

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (0: any free port), got {port}")
    run = Path(run)
    if not searched_iterations(run):
        _load(run, None)  # says what the directory holds instead, before anything listens
    pages = _Pages(run)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self, body: bool = True):  # noqa: N802 (the name http.server calls)
            status, document = pages.page(unquote(urlsplit(self.path).path))
            data = document.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):  # noqa: N802
            self.do_GET(body=False)

        def log_message(self, fmt, *args):  # no line per request
            pass

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); "
                         "pass another --port (0 picks a free one)") from None


def view(args: ViewArgs, console) -> int:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(args.run, args.host, args.port)
    host, port = server.server_address[:2]
    console.print(f"serving the search trees of {args.run} at http://{host}:{port}/ (Ctrl-C stops)", markup=False,
                  soft_wrap=True)
    console.file.flush()  # the address, now, also when the output is a pipe
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

