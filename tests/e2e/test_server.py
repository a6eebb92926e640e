"""A real headless ComfyUI with FrozenTune loaded: imports, HTTP API and comfy-cli runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from harness.comfy_env import PACK_NAME, comfyui_dir

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
STOCK = WORKFLOWS / "stock_text_to_image_sd15.json"


def test_pack_imports_in_under_a_second(comfy_server):
    times = {Path(p).name: t for p, t in comfy_server.import_times().items()}
    seconds, failed = times[PACK_NAME]
    assert not failed
    assert seconds < 1.0, f"FrozenTune took {seconds}s to import"


def test_stock_workflow_runs_through_http_api(comfy_server):
    from harness.server import error_message

    entry = comfy_server.run(json.loads(STOCK.read_text()), timeout=300)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    (png,) = comfy_server.output_files(entry)
    with Image.open(png) as img:
        assert img.size == (64, 64)
        assert json.loads(img.info["prompt"])  # SaveImage embedded the executed graph


def test_stock_workflow_runs_through_comfy_cli(comfy_server):
    comfy = Path(sys.executable).parent / "comfy"
    out = subprocess.run(
        [comfy, "--skip-prompt", "--workspace", str(comfyui_dir()), "run", "--workflow", str(STOCK), "--wait",
         "--host", comfy_server.host, "--port", str(comfy_server.port), "--timeout", "300"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    envelope = json.loads(out.stdout.strip().splitlines()[-1])
    assert envelope["ok"], envelope
    assert envelope["data"]["status"] == "completed", envelope
    assert any(".png" in url for url in envelope["data"]["outputs"]), envelope


def test_make_serve_entry_point_serves_the_page(tmp_path):
    """`make serve` runs `python -m harness.serve`: it must answer /system_stats and show the pack."""
    import time
    import urllib.request

    from harness.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness.serve", "--port", str(port)],
                            cwd=Path(__file__).resolve().parents[1], stdout=open(tmp_path / "serve.log", "w"),
                            stderr=subprocess.STDOUT)
    try:
        stats = None
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2) as r:
                    stats = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        assert stats is not None and "comfyui_version" in stats["system"]
        assert f"custom_nodes/{PACK_NAME}" in (tmp_path / "serve.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
