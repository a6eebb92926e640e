"""Helpers for the reliability tier: submit a prompt and classify the answer, and watch the disk and memory.

A prompt ends one of three ways: ``refused`` (POST /prompt answers 400 with validation errors, naming the
inputs), ``error`` (it ran and a node raised; ComfyUI reports the exception message) or ``success``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .server import ComfyServer, ServerError, error_message

# What a queued job may write under a server's base directory. Anything else is a leak.
WRITABLE = ("output", "temp", "user", "models/unitune", "models/loras", "models/controlnet", "models/embeddings",
            "models/ipadapter_embeds", "comfyui.log")


@dataclass
class Outcome:
    status: str  # "refused" | "error" | "success" | "interrupted"
    message: str = ""
    input_names: list[str] = field(default_factory=list)  # inputs ComfyUI's validation named
    entry: dict | None = None
    prompt_id: str | None = None

    def names(self, word: str) -> bool:
        """Does the answer name ``word`` (an input name, a file name)?"""
        return word in self.input_names or word in self.message


def _refusal(body: dict) -> Outcome:
    names, messages = [], [body.get("error", {}).get("message", "") if body.get("error") else ""]
    for node in (body.get("node_errors") or {}).values():
        for e in node.get("errors", []):
            names.append(e.get("extra_info", {}).get("input_name", ""))
            messages.append(f"{e.get('message')}: {e.get('details')}")
    return Outcome("refused", "; ".join(m for m in messages if m), names)


def submit(srv: ComfyServer, prompt: dict) -> tuple[Outcome | None, str | None]:
    """POST a prompt: (the refusal, None) if validation refused any node of it, else (None, its prompt id).

    ComfyUI still queues a prompt whose other outputs are valid (HTTP 200 with ``node_errors``): that run
    is waited for, so the queue is idle again when a refusal is returned.
    """
    try:
        answer = srv.post("/prompt", {"prompt": prompt, "client_id": srv.client_id})
    except ServerError as err:
        text = str(err)
        if "HTTP 400" not in text:
            raise
        return _refusal(json.loads(text.split(": ", 1)[1])), None
    if answer.get("node_errors"):
        srv.wait(answer["prompt_id"])
        return _refusal(answer), None
    return None, answer["prompt_id"]


def finish(srv: ComfyServer, prompt_id: str, timeout: float = 600) -> Outcome:
    entry = srv.wait(prompt_id, timeout)
    messages = entry["status"].get("messages", [])
    if any(event == "execution_interrupted" for event, _ in messages):
        return Outcome("interrupted", "", [], entry, prompt_id)
    if entry["status"]["status_str"] == "success":
        return Outcome("success", "", [], entry, prompt_id)
    for event, data in messages:
        if event == "execution_error":
            return Outcome("error", str(data.get("exception_message", "")), [], entry, prompt_id)
    return Outcome("error", error_message(entry), [], entry, prompt_id)


def run(srv: ComfyServer, prompt: dict, timeout: float = 600) -> Outcome:
    refused, prompt_id = submit(srv, prompt)
    return refused if refused is not None else finish(srv, prompt_id, timeout)


Snapshot = dict[str, tuple[int, int]]


def snapshot(root: Path) -> Snapshot:
    """``{relative path: (size, mtime_ns)}`` of every file and folder under ``root``; symlinks are not followed."""
    root = Path(root)
    tree: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            size = 0 if path.is_dir() and not path.is_symlink() else st.st_size
            tree[str(path.relative_to(root))] = (size, st.st_mtime_ns if not path.is_dir() else 0)
    return tree


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """Paths created, removed or changed (size or mtime) between two snapshots."""
    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k))


def leaks(changed: list[str], writable: tuple[str, ...] = WRITABLE) -> list[str]:
    """Changed paths outside the folders a job may write, or hidden files (``.name``) anywhere."""
    bad = []
    for rel in changed:
        parts = Path(rel).parts
        inside = any(rel == w or rel.startswith(w + "/") for w in writable)
        if not inside or any(p.startswith(".") for p in parts):
            bad.append(rel)
    return bad


def new_files(changed: list[str], after: Snapshot, before: Snapshot, under: str) -> list[str]:
    """Files created under the folder ``under`` (relative to the base)."""
    return [k for k in changed if k.startswith(under + "/") and k in after and k not in before
            and after[k][0] > 0]


def vm_rss(pid: int) -> int:
    """Resident set size of a process in bytes (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) * 1024


def running_prompt(srv: ComfyServer) -> str | None:
    """The id of the prompt the server is executing now (None when idle)."""
    running = srv.get("/queue")["queue_running"]
    return running[0][1] if running else None


def interrupt_when_running(srv: ComfyServer, prompt_id: str, after: float = 0.5, timeout: float = 600) -> float:
    """POST /interrupt once ``prompt_id`` has run for ``after`` seconds; returns when it was sent (monotonic)."""
    deadline = time.monotonic() + timeout
    started = None
    while time.monotonic() < deadline:
        if running_prompt(srv) == prompt_id:
            started = started or time.monotonic()
            if time.monotonic() - started >= after:
                srv.post("/interrupt", {"prompt_id": prompt_id})
                return time.monotonic()
        elif started is not None:
            raise AssertionError(f"{prompt_id} finished before it could be interrupted")
        time.sleep(0.05)
    raise AssertionError(f"{prompt_id} never ran within {timeout:.0f}s")
