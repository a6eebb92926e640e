"""Soak: 60 queued mixed jobs with 5 cancels in the middle; afterwards the base model samples exactly as on a
fresh server and the server's memory (VmRSS) is where it was after the first job.

Runs last in the tier (file order): the fresh server it starts frees the shared one's models.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from PIL import Image

from harness import graphs, hostile

log = logging.getLogger(__name__)

STOCK = Path(__file__).resolve().parents[1] / "workflows" / "stock_text_to_image_sd15.json"
JOBS = 60
CANCELLED_AT = (10, 20, 30, 40, 50)  # queue positions of the long jobs that are cancelled while running
RSS_TOLERANCE = 0.10


def _job(k: int) -> tuple[str, dict]:
    """The k-th queued job: inference, UniTune training + save, or ControlNet-Zero training + save."""
    if k in CANCELLED_AT:
        return "cancel", graphs.unitune_fine_tune(steps=400, seed=k).prompt()
    kind = ("infer", "unitune", "infer", "controlnet")[k % 4]
    if kind == "infer":
        return kind, graphs.stock_text_to_image(seed=1000 + k, text="soak").prompt()  # one text: encoded once
    if kind == "unitune":
        return kind, graphs.unitune_save(filename=f"unitune/soak_{k}", seed=k).prompt()
    return kind, graphs.controlnet_zero_save(filename=f"controlnet_zero/soak_{k}", seed=k).prompt()


def _first_job() -> dict:
    """Job 0 uses every kind at once, so every model and buffer the soak needs is in memory after it."""
    return graphs.merge(graphs.stock_text_to_image(seed=999, text="soak"),
                        graphs.unitune_save(filename="unitune/soak_0", seed=0),
                        graphs.controlnet_zero_save(filename="controlnet_zero/soak_0", seed=0))


def _stock_pixels(srv) -> bytes:
    from harness.server import error_message

    entry = srv.run(json.loads(STOCK.read_text()), timeout=300)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    (png,) = srv.output_files(entry)
    with Image.open(png) as img:
        return img.convert("RGB").tobytes()


@pytest.mark.long
def test_sixty_mixed_jobs_with_five_cancels_leave_the_base_and_memory_as_they_were(hostile_server, fresh_server):
    srv = hostile_server
    started = time.monotonic()
    first = hostile.run(srv, _first_job())
    assert first.status == "success", first.message
    rss_first = hostile.vm_rss(srv.proc.pid)

    queued = [(0, "mixed", first.prompt_id)]
    for k in range(1, JOBS):
        kind, prompt = _job(k)
        refused, prompt_id = hostile.submit(srv, prompt)
        assert refused is None, f"job {k} ({kind}) was refused: {refused.message}"
        queued.append((k, kind, prompt_id))
    latencies = []
    for _k, kind, prompt_id in queued:
        if kind == "cancel":
            sent = hostile.interrupt_when_running(srv, prompt_id, after=0.5)
            while hostile.running_prompt(srv) == prompt_id:
                time.sleep(0.02)
            latencies.append(time.monotonic() - sent)
    outcomes = {k: (kind, hostile.finish(srv, prompt_id, timeout=600)) for k, kind, prompt_id in queued}
    rss_after = hostile.vm_rss(srv.proc.pid)
    soak_seconds = time.monotonic() - started

    wrong = {k: (kind, o.status, o.message[:200]) for k, (kind, o) in outcomes.items()
             if o.status != ("interrupted" if kind == "cancel" else "success")}
    assert not wrong, f"jobs that did not end as expected: {wrong}"
    saved = {"unitune": srv.base / "models" / "unitune", "controlnet": srv.base / "models" / "controlnet" / "controlnet_zero"}
    for k, (kind, _) in outcomes.items():
        if kind in saved:
            assert (saved[kind] / f"soak_{k}.safetensors").is_file(), f"job {k} ({kind}) saved no file"
    assert not [p for folder in saved.values() for p in folder.glob(".*.tmp")], "temporary files left"

    soaked = _stock_pixels(srv)
    with fresh_server() as fresh:
        clean = _stock_pixels(fresh)
    log.warning("soak: %d jobs in %.1f s, cancel latency max %.2f s (%s), VmRSS after job 0 %.1f MiB, after all "
                "%.1f MiB (%+.1f%%)", JOBS, soak_seconds, max(latencies), ", ".join(f"{t:.2f}" for t in latencies),
                rss_first / 2**20, rss_after / 2**20, 100 * (rss_after / rss_first - 1))
    assert len(latencies) == len(CANCELLED_AT)
    assert soaked == clean, "after the soak the base model no longer samples bit-identically to a fresh server"
    assert rss_after <= rss_first * (1 + RSS_TOLERANCE), (
        f"VmRSS grew from {rss_first / 2**20:.1f} MiB after the first job to {rss_after / 2**20:.1f} MiB")
