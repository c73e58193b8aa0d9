"""The run directory: atomic writes and the files every run leaves behind.

Layout::

    runs/<name>/
        config.json           the full configuration of the run
        metrics.jsonl         one JSON object per evaluated iteration (line 0: the starting model)
        curves.png            held-out accuracy and pair counts per iteration
        summary.json          final table, wall time, where the model is
        state.json            completed stages, checksums of their outputs, elapsed time
        iter_000/
            heldout_correct.jsonl   per-problem verdicts of the start model
        iter_001/
            trees.json        every searched tree (search.export.tree_to_dict)   [search]
            rollouts.jsonl    the policy rollouts made during search              [search]
            pairs.jsonl       step-level preference pairs (DESIGN.md record schema) [extract]
            trajectories.jsonl                                                   [extract]
            sft.jsonl         the verified-correct solutions for the NLL term     [extract]
            train.json        per-step trainer metrics                            [train]
            model/            the policy after this iteration (save_pretrained)   [train]
            heldout_correct.jsonl                                                 [eval]

Every file is written atomically (temporary file in the same directory, fsync, rename), and a
stage is recorded as completed in ``state.json`` only after all of its outputs are durable.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from engine.errors import UsageError

__all__ = ["RunLock", "atomic_write_bytes", "atomic_write_text", "disk_full_guard", "write_json", "write_jsonl",
           "read_json", "read_jsonl", "file_sha256", "save_figure", "save_model_atomic", "tree_checksums"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def disk_full_guard(run: Path):
    """Turn "no space left" while writing into a :class:`UsageError` that says what to do. The
    writes themselves are atomic, so the run directory keeps its last complete state."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        raise UsageError(f"disk full{where} ({os.strerror(exc.errno)}); nothing partial was kept in {run}. "
                         f"Free some space, then continue with: engine train --resume {run}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync, rename:
    readers see the old file or the new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # name the file the caller meant, not the temporary one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for ``text`` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig, path: str | os.PathLike, **savefig_kw) -> None:
    """Save matplotlib figure ``fig`` to ``path`` (its format from the suffix) as
    :func:`atomic_write_bytes` writes."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix[1:].lower(), **savefig_kw)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path: str | os.PathLike):
    """Parsed JSON, or a :class:`UsageError` naming the file when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; the run directory is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is corrupt or truncated ({exc}); restore it from a backup "
                         "or start a new run") from None


def read_jsonl(path: str | os.PathLike) -> list:
    """Parsed JSON lines, or a :class:`UsageError` naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; the run directory is incomplete") from None
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} line {i} is corrupt ({exc.msg}); restore it from a backup "
                             "or start a new run") from None
    return out


def save_model_atomic(model, tokenizer, target: str | os.PathLike) -> None:
    """``save_pretrained`` into a temporary sibling directory, fsync every file, then rename into
    place; on failure (a full disk) the temporary directory is removed and ``target`` is untouched."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports a full disk as its own error type, with the OS error in the text
        if not isinstance(exc, OSError) and any(f"os error {e})" in str(exc) for e in _NO_SPACE):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc
        raise
    old = target.parent / f".{target.name}.old"
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_checksums(root: Path, paths: Iterable[Path]) -> dict[str, str]:
    """``{path relative to root: sha256}`` for every file in ``paths`` (directories expanded)."""
    out = {}
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f.relative_to(root))] = file_sha256(f)
    return out


def _lock_holder(inode: int) -> str:
    """The pid holding a flock on ``inode``, read from /proc/locks (best effort)."""
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                return f"process {parts[4]}"
    except OSError:
        pass
    return "another process"


class RunLock:
    """An exclusive ``flock`` on the run directory itself for the life of the process (released by
    the kernel when the process dies, even by SIGKILL), so two processes never write one run. No
    file is created, so a failed attempt leaves the directory exactly as it was."""

    def __init__(self, run: Path):
        self.path = Path(run)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(os.fstat(fd).st_ino)
            os.close(fd)
            raise UsageError(f"run directory {self.path} is in use by {holder}; wait for it to finish (or stop "
                             "it) before resuming, or start a new run with another --name") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
