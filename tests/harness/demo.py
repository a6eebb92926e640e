"""``make demo``: run every example workflow on a headless ComfyUI with FrozenTune and tiny models.

Builds the tiny random checkpoints (cached), starts ComfyUI with its own base directory under
``build/demo_base``, queues each workflow of ``workflows/`` through the HTTP API (the model names
in the workflows resolve to the tiny stand-ins, see ``harness.server.STAND_INS``), copies the
outputs to ``out/<workflow>/`` and prints one line per workflow. Exit code 1 if any failed.

Until the pack ships its own workflows, the stock text-to-image smoke workflow stands in.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from harness import comfy_env

log = logging.getLogger("frozentune.demo")

REPO = comfy_env.REPO_ROOT
FALLBACK = REPO / "tests" / "workflows" / "stock_text_to_image_sd15.json"


def workflow_files() -> list[Path]:
    return sorted((REPO / "workflows").glob("*.json")) or [FALLBACK]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "out", help="where the outputs are copied")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per workflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    comfy_env.import_comfy()
    from harness.server import ComfyServer, ServerError, error_message, prepare_base

    t0 = time.monotonic()
    base = prepare_base(REPO / "build" / "demo_base")
    log.info("tiny models ready (%.1fs); starting ComfyUI headless", time.monotonic() - t0)
    results = []
    try:
        with ComfyServer(base) as srv:
            log.info("ComfyUI up at %s (%.1fs)", srv.url, time.monotonic() - t0)
            for path in workflow_files():
                start = time.monotonic()
                try:
                    entry = srv.run(json.loads(path.read_text()), timeout=args.timeout)
                    ok = entry["status"]["status_str"] == "success"
                    detail = "" if ok else error_message(entry)
                    files = srv.output_files(entry) if ok else []
                except ServerError as err:
                    ok, detail, files = False, str(err), []
                dest = args.out / path.stem
                if dest.exists():
                    shutil.rmtree(dest)
                copied = []
                for f in files:
                    dest.mkdir(parents=True, exist_ok=True)
                    copied.append(Path(shutil.copy2(f, dest / f.name)))
                seconds = time.monotonic() - start
                shown = ", ".join(str(c.relative_to(REPO)) if c.is_relative_to(REPO) else str(c) for c in copied)
                log.info("%-4s %-58s %6.1fs  %s", "OK" if ok else "FAIL", path.stem, seconds, shown or detail)
                results.append(ok and bool(copied))
    except ServerError as err:
        log.error("demo: %s", err)
        return 1
    passed = sum(results)
    log.info("demo: %d/%d workflows succeeded in %.1fs; outputs in %s",
             passed, len(results), time.monotonic() - t0, args.out)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
