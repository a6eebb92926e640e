"""Re-run a Save node whose file was deleted, although its inputs did not change.

ComfyUI caches an output node's result by its inputs: re-queuing an identical prompt after the saved
file was deleted would return the old path, which no longer exists. A Save node remembers each path
it wrote (``remember``) and returns ``fingerprint(...)`` from its ``fingerprint_inputs``: the value
changes (a counter that only grows) as soon as a file it wrote for these inputs is gone, so ComfyUI
runs the node again and the file is written again.

``fingerprint_inputs`` sees only the node's widget values (a linked input arrives as None, and None
matches any value); records are kept per node class and per node id in the prompt (ComfyUI's
executing context), so other Save nodes are not re-run. Memory only: a restarted server has an
empty cache as well.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_execution.utils import get_executing_context

_lock = threading.Lock()
_records: dict[tuple[str, str], list[_Record]] = {}
_generation: dict[tuple[str, str], int] = {}


@dataclass(frozen=True)
class _Record:
    inputs: dict[str, Any]
    path: Path


def _key(node: str) -> tuple[str, str]:
    context = get_executing_context()
    return node, (context.node_id if context is not None else "")


def _matches(record: _Record, inputs: dict[str, Any]) -> bool:
    return all(value is None or record.inputs.get(name) == value for name, value in inputs.items())


def remember(node: str, path: Path | str, **inputs: Any) -> None:
    """Call from ``execute`` after writing ``path`` with these widget values (``node``: the node id)."""
    key = _key(node)
    with _lock:
        _records.setdefault(key, []).append(_Record(dict(inputs), Path(path)))


def fingerprint(node: str, **inputs: Any) -> int:
    """Return from ``fingerprint_inputs``: grows when a file written for these inputs no longer exists."""
    key = _key(node)
    with _lock:
        records = _records.get(key, [])
        gone = [r for r in records if _matches(r, inputs) and not r.path.exists()]
        if gone:
            _records[key] = [r for r in records if r not in gone]
            _generation[key] = _generation.get(key, 0) + 1
        return _generation.get(key, 0)
