"""Build the offline GPU-check bundle (``make gpu-bundle``): what a lent GPU machine lacks, in one folder.

Standard library only: it runs on the system Python, with a package registry, before any GPU exists.
The GPU machine has Python 3.12, its own CUDA torch and a fixed set of packages
(``GPU_MACHINE_PACKAGES``), no registry and no internet; it receives the working tree plus at most 64 MiB
of ignored paths. ``build/gpu_bundle/`` (git-ignored, at most ``MAX_BYTES``) holds:

- ``comfyui/``                 ComfyUI 0.3.75 (the pinned copy ``make setup`` extracts) without its tests,
                               examples, models/ and output/ folders, input/ but its example.png, and the
                               tokenizers of model families the check never loads (SD1.5 and SDXL use ``comfy/sd1_tokenizer``, which stays;
                               the ``comfy/text_encoders`` tokenizers the DiT runs build travel as ``<name>.tar.gz``
                               (``PACKED_TOKENIZERS``: 2.3 MiB instead of 6.6), unpacked on the GPU machine into the
                               scratch copy of ComfyUI ``bench/run_gpu_check_offline.sh`` runs from
                               (``gpu_bundle.py --unpack``), so the bundle never grows)
- ``wheels/``                  the wheels of ``OFFLINE_REQUIREMENTS``, for CPython 3.12 on manylinux x86_64
                               (pure Python where the package has no compiled part)
- ``requirements-offline.txt`` those exact pins, what ``bench/run_gpu_check_offline.sh`` installs with
                               ``pip install --no-index --no-deps --target`` on the GPU machine
- ``manifest.json``            the ComfyUI version, the pins and the bundle's size

ComfyUI imports the check skips headless (see ``SKIPPED``) are never installed: the server is started
with ``--front-end-root`` (an empty folder) and ``--disable-api-nodes`` (``bench/gpu_check.py``), the app
database is optional in ComfyUI 0.3.75 (``main.setup_database`` logs and goes on) and the check runs with an
in-memory one anyway.

Environment: ``COMFYUI_DIR`` (another ComfyUI 0.3.75 tree), ``GPU_BUNDLE_DIR`` (another output folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import setup_runtime  # noqa: E402 - stdlib only, shares the pinned ComfyUI copy

log = logging.getLogger("frozentune.gpu_bundle")

ROOT = setup_runtime.ROOT
BUNDLE = Path(os.environ.get("GPU_BUNDLE_DIR") or ROOT / "build" / "gpu_bundle")
BUNDLE_VERSION = 1
MAX_BYTES = 60 * 2**20
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The packages the GPU machine lacks that the check imports (in this process or in the ComfyUI server it
# starts), pinned to the releases the project's venv tests with, and why each is there.
OFFLINE_REQUIREMENTS = {
    "torchsde==0.2.6": "comfy/k_diffusion/sampling.py imports it at the top (every sampler)",
    "trampoline==0.1.2": "torchsde's dependency",
    "av==18.1.0": "comfy_api/latest/_ui.py and _input_impl import it at the top: every V3 node needs it",
    "kornia==0.9.0": "comfy_extras/nodes_canny.py (the Canny node of the InstantStyle ControlNet workflow)",
    "kornia_rs==0.2.0": "kornia's dependency (compiled)",
    "spandrel==0.4.2": "comfy_extras/nodes_upscale_model.py (stock node; without it that module fails to import)",
    "pydantic==2.14.4": "comfy_config (nodes.load_custom_node reads the pack's pyproject.toml with it)",
    "pydantic_core==2.50.5": "pydantic's dependency (compiled)",
    "annotated-types==0.8.0": "pydantic's dependency",
    "typing-inspection==0.4.5": "pydantic's dependency",
    "pydantic-settings==2.16.3": "comfy_config/config_parser.py",
    "python-dotenv==1.2.4": "pydantic-settings' dependency",
    "comfy-cli==1.23.0": "tests/harness/server.py: comfy_cli.workflow_to_api (stdlib only; installed --no-deps)",
    "bitsandbytes==0.50.2": "the 8-bit AdamW of the SDXL ControlNet-Zero items (CPU and CUDA 13.0 libraries only)",
}
# What ComfyUI 0.3.75's requirements.txt (or main.py/server.py) would import that the check does without.
SKIPPED = {
    "comfyui-frontend-package": "the server runs with --front-end-root <empty folder>: no page is served",
    "comfyui-workflow-templates": "server.py logs its absence and serves no /templates",
    "comfyui-embedded-docs": "server.py logs its absence and serves no /docs",
    "alembic, SQLAlchemy": "app/database/db.py catches the ImportError; main.setup_database goes on without it",
    "comfy_api_nodes' extras": "--disable-api-nodes: no API node is loaded (none is used; no internet there)",
    "diffusers, pytest, ruff, playwright": "test tools only; the check imports none of them",
}
# bitsandbytes ships one library per CUDA/ROCm/XPU release (41 MiB): keep the CPU one (the dry run) and
# the one for the GPU machine's torch (CUDA 13.0).
BNB_KEEP = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda130)\.so$")
BNB_DROP = re.compile(r"bitsandbytes/libbitsandbytes_\w+\.so$")
# Parts of the ComfyUI tree the check never reads.
COMFY_SKIP_TOP = {"tests", "tests-unit", "script_examples", "models", "output", "user", "temp",
                  "custom_nodes", ".github", ".ci"}
COMFY_SKIP_TOKENIZERS = "comfy/text_encoders"  # its *_tokenizer/ folders: T5, Llama, Qwen, ... (17 MiB)
# but these, packed (gzip: zlib is in every Python that runs pip; xz would save 0.7 MiB more): T5-XXL's (2.3 MiB; 0.6
# packed): Flux.1's, SD3's and Chroma's tokenizers build it, also for a checkpoint without a T5 (gpu_check --dit);
# Qwen2.5's (4.3 MiB; 1.7 packed): Qwen-Image's and Z-Image's (Qwen3) tokenizers read it (gpu_check --families).
# Unpacked, the bundle would be over MAX_BYTES (62.4 MiB).
PACKED_TOKENIZERS = ("t5_tokenizer", "qwen25_tokenizer")


# The GPU machine image's Python packages (November 2026; a copy of ../shared/research/gpu_machine_packages.txt).
GPU_MACHINE_PACKAGES = Path(__file__).resolve().parent / "gpu_machine_packages.txt"


def gpu_machine_packages() -> set[str]:
    return {normalize(line) for line in GPU_MACHINE_PACKAGES.read_text().splitlines() if line.strip()}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().split("==")[0]).lower()


def pins() -> list[str]:
    return list(OFFLINE_REQUIREMENTS)


def copy_comfyui(src: Path, dest: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(src).as_posix()
        skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if rel == ".":
            skip |= {n for n in names if n in COMFY_SKIP_TOP}
        if rel == "input":  # harness.server copies example.png, the image the example workflows load
            skip |= {n for n in names if n != "example.png"}
        if rel == COMFY_SKIP_TOKENIZERS:
            skip |= {n for n in names if n.endswith("_tokenizer") and Path(folder, n).is_dir()}
        return skip

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=ignore, symlinks=True)
    (dest / "custom_nodes").mkdir()  # the server's custom nodes live in its --base-directory
    for name in PACKED_TOKENIZERS:
        folder = src / COMFY_SKIP_TOKENIZERS / name
        if folder.is_dir():
            with tarfile.open(dest / COMFY_SKIP_TOKENIZERS / f"{name}.tar.gz", "w:gz", compresslevel=9) as tar:
                tar.add(folder, arcname=name, filter=_portable)


def _portable(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unpack_tokenizers(comfy: Path) -> list[Path]:
    """Unpack the packed tokenizers (``PACKED_TOKENIZERS``) of a copy of the bundle's ComfyUI at ``comfy`` where the
    folder is missing (on the GPU machine, before the check runs); each lands whole or not at all. Returns the new
    folders."""
    made = []
    for archive in sorted((comfy / COMFY_SKIP_TOKENIZERS).glob("*_tokenizer.tar.gz")):
        folder = archive.with_name(archive.name.removesuffix(".tar.gz"))
        if folder.is_dir():
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
            os.replace(tmp / folder.name, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        made.append(folder)
    return made


def download(requirement: str, dest: Path) -> Path:
    """The wheel of ``requirement`` for CPython 3.12 on manylinux x86_64 (or pure Python), into ``dest``."""
    name = normalize(requirement).replace("-", "_")
    have = [p for p in dest.glob("*.whl") if normalize(p.name.split("-")[0]).replace("-", "_") == name
            and p.name.split("-")[1] == requirement.split("==")[1]]
    if have:
        return have[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest), requirement]
    for platform in (*PLATFORMS, "any"):
        cmd[-1:-1] = ["--platform", platform]
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return download(requirement, dest)


def slim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the bitsandbytes wheel with only the libraries in BNB_KEEP (and its RECORD to match)."""
    with zipfile.ZipFile(wheel) as zin:
        names = zin.namelist()
        if not any(BNB_DROP.search(n) and not BNB_KEEP.search(n) for n in names):
            return  # already slim
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if BNB_DROP.search(info.filename) and not BNB_KEEP.search(info.filename):
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if not (BNB_DROP.search(line.split(",")[0]) and not BNB_KEEP.search(line.split(",")[0]))
                                   ).encode()
                zout.writestr(info, data)
    tmp.replace(wheel)


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def build() -> Path:
    comfy = setup_runtime.comfyui_dir()
    if comfy == setup_runtime.PINNED_COMFYUI:
        setup_runtime.fetch_pinned_comfyui(Path(sys.executable))
    version = (comfy / "comfyui_version.py").read_text()
    if f'"{setup_runtime.COMFYUI_VERSION}"' not in version:
        raise setup_runtime.SetupError(f"{comfy} is not ComfyUI {setup_runtime.COMFYUI_VERSION}: {version.strip()}")

    available = gpu_machine_packages()
    clash = [p for p in pins() if normalize(p) in available]
    if clash:
        raise setup_runtime.SetupError(f"the GPU machine already has {', '.join(clash)}: drop them from the bundle")

    BUNDLE.mkdir(parents=True, exist_ok=True)
    copy_comfyui(comfy, BUNDLE / "comfyui")
    wheels = BUNDLE / "wheels"
    wheels.mkdir(exist_ok=True)
    wanted = set()
    for requirement in pins():
        wheel = download(requirement, wheels)
        if normalize(requirement) == "bitsandbytes":
            slim_bitsandbytes(wheel)
        wanted.add(wheel.name)
    for stale in set(p.name for p in wheels.glob("*.whl")) - wanted:
        (wheels / stale).unlink()
    (BUNDLE / "requirements-offline.txt").write_text(
        "# installed on the GPU machine by bench/run_gpu_check_offline.sh: pip install --no-index --no-deps\n"
        + "".join(f"{p}  # {why}\n" for p, why in OFFLINE_REQUIREMENTS.items()))
    manifest = {"bundle_version": BUNDLE_VERSION, "comfyui": setup_runtime.COMFYUI_VERSION, "python": PYTHON_VERSION,
                "requirements": pins(), "wheels": sorted(wanted), "skipped": SKIPPED}
    (BUNDLE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return BUNDLE


def summary(bundle: Path) -> tuple[int, str]:
    total = size_of(bundle)
    lines = [f"gpu-bundle: {bundle} holds {total / 2**20:.1f} MiB (limit {MAX_BYTES / 2**20:.0f} MiB)",
             f"  comfyui/  ComfyUI {setup_runtime.COMFYUI_VERSION} source, trimmed: "
             f"{size_of(bundle / 'comfyui') / 2**20:.1f} MiB"]
    for wheel in sorted((bundle / "wheels").glob("*.whl")):
        lines.append(f"  wheels/{wheel.name}  {wheel.stat().st_size / 2**20:.1f} MiB")
    lines.append("  requirements-offline.txt, manifest.json")
    lines.append("  skipped (headless): " + "; ".join(f"{k}: {v}" for k, v in SKIPPED.items()))
    return total, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="gpu-bundle: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--unpack"]:  # on the GPU machine: bench/run_gpu_check_offline.sh
        if len(argv) != 2:
            log.error("usage: gpu_bundle.py --unpack <the bundle's comfyui folder>")
            return 2
        for folder in unpack_tokenizers(Path(argv[1])):
            log.info("unpacked %s", folder)
        return 0
    try:
        bundle = build()
    except setup_runtime.SetupError as err:
        log.error("%s", err)
        return 2
    except subprocess.CalledProcessError as err:
        log.error("command failed with exit code %s: %s", err.returncode, " ".join(map(str, err.cmd)))
        return 1
    total, text = summary(bundle)
    print(text)
    if total > MAX_BYTES:
        log.error("the bundle is over %d MiB: it would not travel to the GPU machine", MAX_BYTES // 2**20)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
