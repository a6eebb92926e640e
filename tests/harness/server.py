"""A real ComfyUI server, started headless with FrozenTune loaded, for e2e tests, the demo and `make serve`.

The server gets its own ``--base-directory`` (custom_nodes/, models/, input/, output/), so it
never touches the ComfyUI tree or the user's models: the pack is linked into its
``custom_nodes/`` and the tiny random checkpoints are linked into ``models/`` under the names the
example workflows use (the stand-ins below).

Standard library only apart from ``comfy_cli`` for UI-to-API workflow conversion.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .comfy_env import PACK_NAME, REPO_ROOT, comfyui_dir

log = logging.getLogger(__name__)

# Model names used by the example workflows -> the tiny family that stands in for them.
STAND_INS: dict[str, dict[str, str]] = {
    "checkpoints": {
        "v1-5-pruned-emaonly.safetensors": "sd15",
        "sd_xl_base_1.0.safetensors": "sdxl",
        "sd_xl_base_1.0_0.9vae.safetensors": "sdxl_blocks",  # SDXL's real block ids (InstantStyle presets)
    },
    # InstantStyle: built by harness.tiny_ipadapter to fit the "sdxl_blocks" checkpoint.
    "ipadapter": {"ip-adapter_sdxl.safetensors": "sdxl_blocks"},
    "clip_vision": {"CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors": "sdxl_blocks"},
    "controlnet": {"diffusers_xl_canny_full.safetensors": "sdxl_blocks"},
}
# Flux.1 / SD3.5 names the example workflows use (as ComfyUI's Flux.1-dev and SD3.5 templates and examples name them)
# -> the harness.tiny_dits file that stands in: a family, a text encoder, "vae16" or "sd3_checkpoint". Apart
# from STAND_INS: bench/gpu_check.py builds a full-size stand-in for every STAND_INS entry.
DIT_STAND_INS: dict[str, dict[str, str]] = {
    "diffusion_models": {"flux1-dev.safetensors": "flux1", "flux1-schnell.safetensors": "flux1_schnell"},
    "text_encoders": {"clip_l.safetensors": "clip_l", "clip_g.safetensors": "clip_g",
                      "t5xxl_fp16.safetensors": "t5xxl"},
    "vae": {"ae.safetensors": "vae16"},
    "checkpoints": {"sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors": "sd3_checkpoint",
                    "sd3.5_large_fp8_scaled.safetensors": "sd3_checkpoint"},
    # InstantStyle on Flux.1 (harness.tiny_flux_ipadapter): XLabs' IP-Adapter as XLabs names it, and the CLIP ViT-L/14
    # image encoder it was trained with (openai/clip-vit-large-patch14) for the stock CLIPVisionLoader.
    "ipadapter": {"flux-ip-adapter.safetensors": "flux_ipadapter_xlabs"},
    "clip_vision": {"clip_vit_large_patch14.safetensors": "clip_vision_l"},
}
# Qwen-Image and Z-Image Turbo (issue 24), as ComfyUI's Qwen-Image and Z-Image Turbo templates name their files ->
# the harness.tiny_stand_ins2 item that stands in (Z-Image Turbo's VAE is Flux's ae.safetensors, above).
for _folder, _names in {
    "diffusion_models": {"qwen_image_fp8_e4m3fn.safetensors": "qwen_image", "z_image_turbo_bf16.safetensors": "z_image"},
    "text_encoders": {"qwen_2.5_vl_7b_fp8_scaled.safetensors": "qwen25_7b", "qwen_3_4b.safetensors": "qwen3_4b"},
    "vae": {"qwen_image_vae.safetensors": "wan21_vae"},
}.items():
    DIT_STAND_INS[_folder].update(_names)
QWEN_ZIMAGE_ITEMS = ("qwen_image", "z_image", "qwen25_7b", "qwen3_4b", "wan21_vae")
# The example workflows carry real-use settings (512 px, 128 training steps). On the tiny random
# models on a CPU the demo and the e2e tests shrink them, by node class, after UI->API conversion.
TINY_RUN_OVERRIDES: dict[str, dict[str, object]] = {
    "ImageScale": {"width": 64, "height": 64},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "FrozenTuneUniTuneFineTune": {"steps": 16, "batch_size": 2},
    "FrozenTuneControlNetZeroTrain": {"steps": 2, "batch_size": 2, "gradient_accumulation": 1, "resolution": 64},
    "FrozenTuneTextualInversionTrain": {"steps": 2, "batch_size": 1},
    "KSampler": {"steps": 6},
    "BasicScheduler": {"steps": 6},
    "FrozenTuneUniTuneEdit": {"steps": 6},
}
# Inputs capped rather than set (0 must stay 0: pivotal_steps 0 is classic UniTune).
TINY_RUN_CAPS: dict[str, dict[str, int]] = {
    "FrozenTuneUniTuneFineTune": {"pivotal_steps": 1},
}
# The half-precision e2e server: UNets stored in bf16 computing natively in bf16 (see native_half_node/).
NATIVE_HALF_ENV = "FROZENTUNE_TEST_NATIVE_HALF"
HALF_ARGS = ["--bf16-unet"]
# ComfyUI's own log line for every UNet it loads (comfy.model_base.BaseModel).
MODEL_DTYPE_LINE = re.compile(r"model weight dtype (\S+), manual cast: (\S+)")
IMPORT_LINE = re.compile(r"^\s*([0-9.]+) seconds( \(IMPORT FAILED\))?: (.+)$")


class ServerError(RuntimeError):
    pass


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and link.resolve() == target.resolve():
            return
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


def dit_stand_in_path(folder: str, item: str) -> Path:
    """The built harness.tiny_dits file for a DIT_STAND_INS entry (built if missing)."""
    from . import tiny_dits

    if item in QWEN_ZIMAGE_ITEMS:
        from . import tiny_stand_ins2

        return tiny_stand_ins2.path(item)
    if folder == "diffusion_models":
        return tiny_dits.diffusion_model_path(item)
    if folder == "text_encoders":
        return tiny_dits.text_encoder_path(item)
    if folder == "vae":
        return tiny_dits.vae_path()
    if folder in ("ipadapter", "clip_vision"):
        from . import tiny_flux_ipadapter

        return tiny_flux_ipadapter.xlabs_path() if folder == "ipadapter" else tiny_flux_ipadapter.clip_vision_l_path()
    return tiny_dits.checkpoint_path(item.removesuffix("_checkpoint"))


def prepare_base(base: Path, with_models: bool = True) -> Path:
    """Lay out a ComfyUI base directory with the pack and the tiny stand-in models linked in."""
    _link(base / "custom_nodes" / PACK_NAME, REPO_ROOT)
    if with_models:
        # these need ComfyUI importable: only the builder process pays for it
        from . import tiny_ipadapter, tiny_models

        # lets the stock CLIPVisionLoader read the tiny CLIP vision stand-in (see harness.tiny_ipadapter)
        _link(base / "custom_nodes" / "frozentune_tiny_clip_vision", Path(__file__).parent / "tiny_clip_vision_node")
        # native half-precision compute on the CPU, only when the server runs with NATIVE_HALF_ENV=1
        _link(base / "custom_nodes" / "frozentune_test_native_half", Path(__file__).parent / "native_half_node")
        # lets the stock loader nodes read the tiny Flux.1/SD3 stand-ins (see harness.tiny_dits)
        _link(base / "custom_nodes" / "frozentune_tiny_dit", Path(__file__).parent / "tiny_dit_node")
        for folder, names in STAND_INS.items():
            for name, family in names.items():
                path = (tiny_models.checkpoint_path(family) if folder == "checkpoints"
                        else tiny_ipadapter.stand_in_path(folder, family))
                _link(base / "models" / folder / name, path)
                _link(base / "models" / folder / path.name, path)
        for folder, names in DIT_STAND_INS.items():
            for name, item in names.items():
                path = dit_stand_in_path(folder, item)
                _link(base / "models" / folder / name, path)
                _link(base / "models" / folder / path.name, path)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    example = comfyui_dir() / "input" / "example.png"  # the image the example workflows load
    if example.exists() and not (base / "input" / example.name).exists():
        shutil.copy2(example, base / "input" / example.name)
    from .disks import write_demo_inputs  # the ControlNet-Zero example's dataset, generated (never committed)

    write_demo_inputs(base / "input")
    return base


def shrink_for_tiny_models(prompt: dict) -> dict:
    """A copy of an API prompt with TINY_RUN_OVERRIDES (and TINY_RUN_CAPS) applied to the nodes they name."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        for name, value in TINY_RUN_OVERRIDES.get(node.get("class_type"), {}).items():
            if name in node.get("inputs", {}):
                node["inputs"][name] = value
        for name, cap in TINY_RUN_CAPS.get(node.get("class_type"), {}).items():
            if isinstance(node.get("inputs", {}).get(name), int):
                node["inputs"][name] = min(node["inputs"][name], cap)
    return out


class ComfyServer:
    """``with ComfyServer(base) as srv:`` starts ComfyUI, waits until it answers, always stops it."""

    def __init__(self, base: Path, port: int | None = None, host: str = "127.0.0.1",
                 cpu: bool | None = None, startup_timeout: float = 180.0, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.base = Path(base)
        self.host = host
        self.port = port if port is not None else free_port()
        if not port_is_free(self.port, host):
            raise ServerError(f"port {self.port} on {host} is already in use: stop what runs there "
                              f"or choose another, e.g. `make serve PORT={self.port + 1}`")
        if cpu is None:
            cpu = os.environ.get("FROZENTUNE_GPU") != "1"
        self.cpu = cpu
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args or []
        self.env = env or {}
        self.log_path = self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, str(comfyui_dir() / "main.py"), "--listen", self.host, "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:"]
        if self.cpu:
            cmd.append("--cpu")
        return cmd + self.extra_args

    def start(self) -> ComfyServer:
        self.base.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_path, "w")  # closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(self.command(), stdout=logfile, stderr=subprocess.STDOUT,
                                     cwd=str(comfyui_dir()), env=env)
        self._logfile = logfile
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} during startup:\n"
                                  f"{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if getattr(self, "_logfile", None) is not None:
            self._logfile.close()
            self._logfile = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- HTTP -----------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as err:
            raise ServerError(f"POST {path} -> HTTP {err.code}: {err.read().decode()[:4000]}") from err
        return json.loads(raw) if raw else None

    def object_info(self) -> dict:
        return self.get("/object_info")

    def to_api(self, workflow: dict) -> dict:
        """UI-format workflow -> API prompt, using the server's /object_info (comfy-cli's converter)."""
        from comfy_cli.workflow_to_api import convert_ui_to_api, is_api_format

        return workflow if is_api_format(workflow) else convert_ui_to_api(workflow, self.object_info())

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, workflow: dict, timeout: float = 600, tiny: bool = True) -> dict:
        """Queue a UI- or API-format workflow and wait for its history entry.

        ``tiny`` shrinks sizes and step counts for the tiny CPU models (TINY_RUN_OVERRIDES).
        """
        prompt = self.to_api(workflow)
        return self.wait(self.queue(shrink_for_tiny_models(prompt) if tiny else prompt), timeout)

    def output_files(self, entry: dict) -> list[Path]:
        files = []
        for out in entry.get("outputs", {}).values():
            for item in out.get("images", []):
                if item.get("type") == "output":
                    files.append(self.base / "output" / item.get("subfolder", "") / item["filename"])
        return files

    # --- log --------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def model_dtypes(self) -> list[tuple[str, str]]:
        """``(weight dtype, manual cast dtype)`` of every UNet the server loaded, from ComfyUI's log."""
        return MODEL_DTYPE_LINE.findall(self.log_text())

    def free(self) -> None:
        """Ask the server to unload its models and drop its cache (before another server starts)."""
        self.post("/free", {"unload_models": True, "free_memory": True})

    def import_times(self) -> dict[str, tuple[float, bool]]:
        """``{custom node path: (seconds, failed)}`` from ComfyUI's "Import times" table."""
        times = {}
        for line in self.log_text().splitlines():
            m = IMPORT_LINE.match(line)
            if m:
                times[m.group(3).strip()] = (float(m.group(1)), bool(m.group(2)))
        return times


def error_message(entry: dict) -> str:
    """The execution error of a failed history entry, in one readable paragraph."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}")
    return json.dumps(entry.get("status"))[:2000]


def view_url(srv: ComfyServer, path: Path) -> str:
    rel = path.relative_to(srv.base / "output")
    query = urllib.parse.urlencode({"filename": rel.name, "subfolder": str(rel.parent), "type": "output"})
    return f"{srv.url}/view?{query}"
