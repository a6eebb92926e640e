"""``make gpu-check`` (bench/gpu_check.py) cannot run here (no GPU), so every path but the device runs here.

- Without a GPU it refuses at once: exit code 2, one line that says why.
- ``--device cpu --tiny`` runs the very same code on the CPU: the random models are built by the same
  builder (tiny UNets, full-size CLIP and real-size KL VAE, detected by ComfyUI's loader; the full-size
  layouts on the meta device), the trainers
  run from their schema defaults in bf16 and fp16, the example workflows run on a headless server
  with the probe, and the report is written. ``make test`` runs one load (SD1.5 in fp16) and one
  workflow; the whole dry run (every load, every workflow) is marked ``long``.
- The pure helpers (schema arguments, step rates, per-item failure capture, step caps) on fakes.

The script is run as a subprocess, as ``make gpu-check`` runs it, so ComfyUI is never imported here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO / "tests", env={**os.environ, **(env or {})})


def test_refuses_without_a_gpu_in_one_line(tmp_path):
    done = _run("--out", str(tmp_path / "report"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU visible"), done.stderr
    assert "CUDA_VISIBLE_DEVICES=" in lines[0] and "NVIDIA GPU" in lines[0]
    assert not (tmp_path / "report").exists(), "a refused run must not write a report"


def test_full_size_needs_the_gpu(tmp_path):
    done = _run("--device", "cpu", "--out", str(tmp_path))
    assert done.returncode != 0 and "--device cpu runs only with --tiny" in done.stderr


class _Input(SimpleNamespace):
    pass


class _FakeNode:
    @classmethod
    def define_schema(cls):
        return SimpleNamespace(node_id="FakeTrainer", inputs=[
            _Input(id="model", optional=False),
            _Input(id="steps", optional=False, default=128),
            _Input(id="precision", optional=False, default="auto", options=["auto", "fp32", "bf16", "fp16"]),
            _Input(id="optimizer", optional=False, default="adamw", options=["adamw", "adafactor"]),
            _Input(id="mode", optional=False, default=None, options=["full", "lora"]),
            _Input(id="images", optional=True),
            _Input(id="new_input", optional=False, default=0.5),
        ])


def test_schema_arguments_take_defaults_and_apply_only_existing_overrides(gpu_check):
    args, applied = gpu_check.schema_arguments(
        _FakeNode, {"model": "M"},
        {"steps": 4, "precision": "bf16", "mixed_precision": "bf16", "optimizer": "adamw8bit"})
    assert args == {"model": "M", "steps": 4, "precision": "bf16", "optimizer": "adamw", "mode": "full",
                    "new_input": 0.5}
    assert applied == {"steps": 4, "precision": "bf16"}  # no mixed_precision input, no adamw8bit option


def test_schema_arguments_name_a_required_input_without_default(gpu_check):
    with pytest.raises(ValueError, match="FakeTrainer input 'model' has no default"):
        gpu_check.schema_arguments(_FakeNode, {}, {})


def test_steps_per_second_skips_the_first_step(gpu_check):
    assert gpu_check.steps_per_second([10.0, 11.0, 11.5, 12.0]) == pytest.approx(1.5)
    assert gpu_check.steps_per_second([10.0]) is None


def test_a_failing_item_is_reported_and_the_run_fails(gpu_check):
    def broken():
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    bad = gpu_check.run_item(gpu_check.Item("broken", "trainer"), broken, "cpu")
    good = gpu_check.run_item(gpu_check.Item("fine", "trainer"), lambda: {"steps": 3, "it_per_s": 2.0}, "cpu")
    assert not bad.passed and bad.error == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert good.passed and good.steps == 3 and good.it_per_s == 2.0
    assert gpu_check.exit_code([good]) == 0 and gpu_check.exit_code([good, bad]) == 1
    assert gpu_check.exit_code([]) == 1


def test_training_steps_are_capped_and_nothing_else(gpu_check):
    prompt = {"1": {"class_type": "FrozenTuneControlNetZeroTrain", "inputs": {"steps": 1000, "checkpoint_every": 250,
                                                                             "resolution": 512}},
              "2": {"class_type": "KSampler", "inputs": {"steps": 30}},
              "3": {"class_type": "FrozenTuneUniTuneFineTune", "inputs": {"steps": 4}}}
    capped, changed = gpu_check.cap_training_steps(prompt, 8)
    assert capped["1"]["inputs"] == {"steps": 8, "checkpoint_every": 8, "resolution": 512}
    assert capped["2"] == prompt["2"] and capped["3"] == prompt["3"]
    assert prompt["1"]["inputs"]["steps"] == 1000, "the input prompt must not change"
    assert changed == {"1 FrozenTuneControlNetZeroTrain.steps": "1000 -> 8",
                       "1 FrozenTuneControlNetZeroTrain.checkpoint_every": "250 -> 8"}


def test_pivotal_and_textual_inversion_steps_are_capped_and_zero_stays_zero(gpu_check):
    prompt = {"1": {"class_type": "FrozenTuneUniTuneFineTune", "inputs": {"steps": 128, "pivotal_steps": 200}},
              "2": {"class_type": "FrozenTuneUniTuneFineTune", "inputs": {"steps": 128, "pivotal_steps": 0}},
              "3": {"class_type": "FrozenTuneTextualInversionTrain", "inputs": {"steps": 1000, "vectors": 1}}}
    capped, changed = gpu_check.cap_training_steps(prompt, 8)
    assert capped["1"]["inputs"] == {"steps": 8, "pivotal_steps": 8}
    assert capped["2"]["inputs"] == {"steps": 8, "pivotal_steps": 0}, "pivotal off (0) must stay off"
    assert capped["3"]["inputs"] == {"steps": 8, "vectors": 1}
    assert changed == {"1 FrozenTuneUniTuneFineTune.steps": "128 -> 8",
                       "1 FrozenTuneUniTuneFineTune.pivotal_steps": "200 -> 8",
                       "2 FrozenTuneUniTuneFineTune.steps": "128 -> 8",
                       "3 FrozenTuneTextualInversionTrain.steps": "1000 -> 8"}


# The e2e tier runs every example workflow twice already. `make test` runs the script's wiring on one load
# (SD1.5 in fp16: the same code as every other load; SDXL in bf16 added 40-70% to this test; the SDXL case adds
# batch 1, checkpointing and 8-bit AdamW, each node-tested) and one workflow with a training node (its step cap
# applied); the whole dry run, every load (both families, bf16 and fp16) and every workflow as a GPU runs them,
# is the `long` test below (`make test-long`, `make test-all`).
DRY_RUN_WORKFLOWS = ("UniTune - fine-tune on a photo then sample (SD1.5)",)
DRY_RUN_LOADS = ("sd15:fp16",)


def test_an_unknown_workflow_name_is_refused(gpu_check):
    with pytest.raises(SystemExit, match="no workflow nope; choose from .*" + re.escape(DRY_RUN_WORKFLOWS[0])):
        gpu_check.workflow_files(["nope"])
    assert [p.stem for p in gpu_check.workflow_files(list(DRY_RUN_WORKFLOWS))] == list(DRY_RUN_WORKFLOWS)


def test_workflows_on_bases_without_full_size_models_are_left_out(gpu_check):
    every = sorted((REPO / "workflows").glob("*.json"))
    kept = gpu_check.workflow_files()
    assert kept and all(p.stem.endswith(("(SD1.5)", "(SDXL)")) for p in kept)
    assert {p.stem for p in every} - {p.stem for p in kept} == {p.stem for p in every if not
                                                                p.stem.endswith(("(SD1.5)", "(SDXL)"))}


def test_loads_default_to_every_family_in_every_dtype_and_a_typo_is_refused(gpu_check):
    assert gpu_check.parse_loads("") == [("sd15", "bf16"), ("sd15", "fp16"), ("sdxl", "bf16"), ("sdxl", "fp16")]
    assert gpu_check.parse_loads(" sdxl:bf16, sd15:fp16 ") == [("sdxl", "bf16"), ("sd15", "fp16")]
    with pytest.raises(SystemExit, match="unknown --loads sdxl:fp32; choose from sd15:bf16, sd15:fp16, "):
        gpu_check.parse_loads("sd15:bf16,sdxl:fp32")


def test_a_bad_loads_value_fails_before_any_work(tmp_path):
    done = _run("--device", "cpu", "--tiny", "--out", str(tmp_path / "report"), "--loads", "sd21:bf16")
    assert done.returncode != 0 and "unknown --loads sd21:bf16" in done.stderr, done.stderr
    assert not (tmp_path / "report").exists()


def dry_run(out: Path, loads: list[str], workflows: list[str], quick: dict | None = None,
            build: Path | None = None) -> dict:
    """Run the CPU dry run and check its report: every item passed, as the GPU run would report it.

    ``quick``: run ``--quick``, whose ``QUICK_TRAINERS`` this is (``loads`` / ``workflows``: what it implies).
    """
    args = ["--device", "cpu", "--tiny", "--out", str(out)]
    if quick:
        args += ["--quick"]
    if build:
        args += ["--build", str(build)]
    if loads and not quick:
        args += ["--loads", ",".join(loads)]
    if workflows and not quick:
        args += ["--workflows", ",".join(workflows)]
    done = _run(*args, timeout=7200)
    report = json.loads((out / "report.json").read_text())
    failed = {i["name"]: i["error"] for i in report["items"] if not i["passed"]}
    assert done.returncode == 0 and not failed, f"{failed}\n{done.stderr[-4000:]}"

    names = [i["name"] for i in report["items"]]
    loads = [tuple(x.split(":")) for x in loads] or [(f, d) for f in ("sd15", "sdxl") for d in ("bf16", "fp16")]
    workflows = workflows or [p.stem for p in sorted((REPO / "workflows").glob("*.json"))  # the script's order
                              if p.stem.endswith(("(SD1.5)", "(SDXL)"))]  # the bases it builds models for
    trainers = {f"{family}:{dtype}": ("unitune_finetune", "controlnet_zero") for family, dtype in loads} | (quick or {})
    expected = [f"{kind} {family} {dtype}" for family, dtype in loads
                for kind in ("load", *trainers[f"{family}:{dtype}"])]
    assert names == expected + [f"workflow {w}" for w in workflows]
    by_name = {i["name"]: i for i in report["items"]}
    for family, dtype in loads:
        assert by_name[f"load {family} {dtype}"]["settings"] == {"unet_dtype": {"bf16": "bfloat16",
                                                                                "fp16": "float16"}[dtype],
                                                                 "manual_cast": "None"}
        for trainer in trainers[f"{family}:{dtype}"]:
            item = by_name[f"{trainer} {family} {dtype}"]
            assert item["steps"] == 2 and item["it_per_s"] > 0, item
            assert item["settings"]["steps"] == 2
            assert item["max_memory_allocated"] is None  # CPU: no CUDA counter
        if family == "sdxl":  # the SDXL case: 8-bit AdamW where the node offers it, checkpointing
            sdxl = {t: by_name[f"{t} {family} {dtype}"]["settings"] for t in trainers[f"{family}:{dtype}"]}
            assert sdxl.get("controlnet_zero", {"optimizer": "adamw8bit"})["optimizer"] == "adamw8bit"
            assert all(s["gradient_checkpointing"] is True for s in sdxl.values()), sdxl
    for w in workflows:
        item = by_name[f"workflow {w}"]
        assert item["outputs"] and all((out / o).is_file() for o in item["outputs"]), item
        assert item["node_it_per_s"], f"the probe saw no node's steps in {w}"
    # the full-size files, built on the meta device by the same builder: ComfyUI detects SD15 / SDXL, and the
    # sizes are those of the published models (SD1.5 UNet 859,520,964; SDXL UNet 2,567,463,684 parameters;
    # 70 SDXL cross-attention layers, as ip-adapter_sdxl numbers them; ViT-bigG: 48 layers)
    layouts = report["full_size_layouts"]
    assert layouts["sd15_unet_parameters"] == 859_520_964 and layouts["sdxl_unet_parameters"] == 2_567_463_684
    assert layouts["sdxl_attn2_layers"] == 70 and layouts["clip_vision_layers"] == 48
    assert 1.2e9 < layouts["sdxl_controlnet_parameters"] < 1.3e9
    md = (out / "report.md").read_text()
    assert all(n in md for n in names) and "**FAIL**" not in md
    return by_name


@pytest.mark.slow
def test_cpu_dry_run_of_one_load_and_one_workflow_writes_the_report(tmp_path):
    by_name = dry_run(tmp_path / "gpu_check", list(DRY_RUN_LOADS), list(DRY_RUN_WORKFLOWS))
    capped = by_name[f"workflow {DRY_RUN_WORKFLOWS[0]}"]["settings"]
    assert [v for k, v in capped.items() if k.endswith("FrozenTuneUniTuneFineTune.steps")] == ["16 -> 2"], capped


def test_quick_covers_each_family_each_trainer_and_dtype_once_with_one_workflow(gpu_check):
    quick = gpu_check.QUICK_TRAINERS
    assert sorted(k.split(":")[0] for k in quick) == list(gpu_check.FAMILIES)
    assert sorted(k.split(":")[1] for k in quick) == sorted(gpu_check.DTYPES)
    assert sorted(t for ts in quick.values() for t in ts) == sorted(gpu_check.TRAINERS)
    assert all(len(ts) == 1 for ts in quick.values())
    assert [p.stem for p in gpu_check.workflow_files([gpu_check.QUICK_WORKFLOW])] == [gpu_check.QUICK_WORKFLOW]


def test_quick_refuses_a_choice_of_its_own(tmp_path):
    done = _run("--device", "cpu", "--tiny", "--quick", "--loads", "sd15:fp16", "--out", str(tmp_path / "r"))
    assert done.returncode != 0 and "--quick chooses the loads and the workflow itself" in done.stderr, done.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.long
def test_cpu_dry_run_of_quick_runs_one_trainer_per_family_and_one_workflow(gpu_check, tmp_path):
    """``--quick`` as the GPU runs it: the stand-ins it needs no workflow for are not built."""
    out = tmp_path / "gpu_check"
    dry_run(out, list(gpu_check.QUICK_TRAINERS), [gpu_check.QUICK_WORKFLOW], quick=gpu_check.QUICK_TRAINERS,
            build=tmp_path / "models")
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True and "--quick" in (out / "report.md").read_text()
    built = sorted(p.name.split("_")[3] for p in (tmp_path / "models" / "tiny").glob("*.safetensors"))
    assert built == ["sd15", "sdxl"], built


@pytest.mark.long
def test_cpu_dry_run_of_everything_the_gpu_runs_writes_the_report(tmp_path):
    """The whole dry run: every load (both families in bf16 and fp16) and every example workflow."""
    by_name = dry_run(tmp_path / "gpu_check", [], [])
    capped = by_name["workflow ControlNet-Zero - train a ControlNet on a folder (SD1.5)"]["settings"]
    assert [v for k, v in capped.items() if k.endswith("FrozenTuneControlNetZeroTrain.checkpoint_every")] == \
        ["250 -> 2"], capped
