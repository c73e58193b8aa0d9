"""Our pair records to and from other trainers' formats.

* TRL preference datasets (``prompt`` / ``chosen`` / ``rejected``, one JSON object per line):
  ``prompt`` is our ``prompt + prefix``. TRL appends EOS to non-conversational continuations, which
  teaches a model to stop after one step; strip it there (or use conversational data) for step pairs.
* Step-DPO's published data (Lai et al., 2024; fields ``prompt``, ``initial_reason_steps``,
  ``chosen``, ``rejected``, as in its Math-Step-DPO-10K release): ``initial_reason_steps`` is our
  ``prefix``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["from_step_dpo", "read_step_dpo", "to_trl", "write_trl_jsonl"]

STEP_DPO_FIELDS = ("prompt", "initial_reason_steps", "chosen", "rejected")


def to_trl(pairs: Iterable[dict]) -> list[dict]:
    """Pair records as TRL's standard (non-conversational) preference rows."""
    return [{"prompt": p["prompt"] + p.get("prefix", ""), "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in pairs]


def write_trl_jsonl(pairs: Iterable[dict], path: str | Path) -> int:
    """Write :func:`to_trl` rows to ``path`` atomically (``datasets.load_dataset("json", ...)``
    reads it); returns the number of rows."""
    rows = to_trl(pairs)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(rows)


def from_step_dpo(rows: Sequence[dict], *, source: str = "data") -> list[dict]:
    """Step-DPO rows as our pair records (``prefix`` = ``initial_reason_steps``); a row missing a
    field raises ``ValueError`` naming the row and the field."""
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in STEP_DPO_FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{source}: row {i} lacks text field(s) {', '.join(missing)}; Step-DPO rows need "
                             f"{', '.join(STEP_DPO_FIELDS)}")
        out.append({"prompt": row["prompt"], "prefix": row["initial_reason_steps"], "chosen": row["chosen"],
                    "rejected": row["rejected"], "task_id": str(row.get("id", i)), "source": "step-dpo"})
    return out


def read_step_dpo(path: str | Path) -> list[dict]:
    """Read Step-DPO's data from a JSON list or a JSONL file into pair records."""
    path = Path(path)
    text = path.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON or JSONL ({exc.msg} at line {exc.lineno}); Step-DPO data is a JSON "
                         "list or one JSON object per line") from None
    return from_step_dpo(rows, source=str(path))
