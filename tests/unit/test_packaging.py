"""The pack as the Comfy Registry and ComfyUI see it: metadata, validation, lint, a cheap import."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_project_metadata_is_registry_ready():
    data = pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] == "frozentune"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["requires-python"] == ">=3.10"
    assert project["license"] == {"file": "LICENSE"}
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text()[:200]
    deps = [re.split(r"[<>=~!; \[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]
    assert not {"torch", "torchvision", "torchaudio", "numpy"} & set(deps), deps
    for key in ("PublisherId", "DisplayName", "Icon", "includes"):
        assert key in comfy, key
    assert comfy["requires-comfyui"] == ">=0.3.75"


def test_comfy_node_validate_passes():
    out = subprocess.run([BIN / "comfy", "--skip-prompt", "node", "validate"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All validation checks passed" in out.stdout + out.stderr, out.stdout + out.stderr


def test_ruff_is_clean():
    out = subprocess.run([BIN / "ruff", "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_importing_the_pack_is_cheap_and_lazy():
    """ComfyUI imports the pack root at startup: it must not pull torch, comfy.* or diffusers."""
    probe = f"""
import importlib.util, json, sys, time
t = time.perf_counter()
spec = importlib.util.spec_from_file_location("frozentune_probe", {str(REPO / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
print(json.dumps({{"seconds": time.perf_counter() - t, "entry": callable(mod.comfy_entrypoint),
                  "heavy": sorted(m for m in ("torch", "comfy", "diffusers", "transformers") if m in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["entry"]
    assert result["heavy"] == []
    assert result["seconds"] < 0.5, result


def test_top_level_layout_is_the_fixed_one():
    for name in ("__init__.py", "nodes", "unitune", "textual_inversion", "guidance", "instantstyle", "controlnet_zero",
                 "training", "storage", "families", "workflows", "tests", "bench", "pyproject.toml", "README.md",
                 "CONTRIBUTING.md", "LICENSE", "Makefile", ".ci/run", ".comfyignore"):
        assert (REPO / name).exists(), name
    ignored = (REPO / ".comfyignore").read_text().split()
    assert {"tests/", "bench/", ".ci/"} <= set(ignored)


README_WORDS = 2000  # the README is for ComfyUI users; developer material lives in CONTRIBUTING.md
INSTALL_WITHIN = 300  # words: a user's first need is putting the pack into the ComfyUI they run


def test_readme_is_short_and_starts_with_the_install():
    words = (REPO / "README.md").read_text().split()
    assert len(words) <= README_WORDS, f"README.md has {len(words)} words (at most {README_WORDS})"
    clone = next((i for i, w in enumerate(words) if w == "clone" and i and words[i - 1] == "git"), None)
    assert clone is not None and clone <= INSTALL_WITHIN, f"`git clone` is at word {clone}, not in the first 300"
    assert "custom_nodes" in " ".join(words[:INSTALL_WITHIN])


def test_docs_links_resolve():
    """Every relative link in README.md, CONTRIBUTING.md and bench/README.md names a file that exists."""
    from urllib.parse import unquote

    broken = []
    for doc in ("README.md", "CONTRIBUTING.md", "bench/README.md"):
        path = REPO / doc
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / unquote(target.split("#")[0])).exists():
                broken.append(f"{doc}: {target}")
    assert not broken, broken
