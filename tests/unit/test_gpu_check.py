"""``make gpu-check`` (bench/gpu_check.py) cannot run here (no GPU), so every path but the device runs here.

- Without a GPU it refuses at once: exit code 2, one line that says why.
- ``--device cpu --tiny`` runs the very same code on the CPU: the random models are built by the same
  builder (tiny UNets, full-size CLIP and real-size KL VAE, detected by ComfyUI's loader; the full-size
  layouts on the meta device), the trainers
  run from their schema defaults in bf16 and fp16, the example workflows run on a headless server
  with the probe, and the report is written. ``make test`` runs one load (SD1.5 in fp16) and one
  workflow; the whole dry run (every load, every workflow) is marked ``long``.
- ``--dit`` the same for Flux.1-dev and SD3.5 (tiny DiTs, fp8 weight storage computing in bf16, through the stock
  loaders): ``make test`` runs the Flux.1 load with its items (UniTune, ControlNet-Zero, Textual Inversion,
  InstantStyle Apply (Flux) + sampling) and the SD3.5 workflow, the whole ``--dit`` dry run is ``long``; the
  full-size DiT layouts (stock detection, parameters, disk) are checked on the meta device.
- ``--families`` the same for Qwen-Image, Z-Image and Chroma (issue 24): ``make test`` runs the Z-Image and Chroma
  loads with UniTune and Textual Inversion (the word file: the family's key at the encoder's width, finite) and the
  Qwen-Image workflow, the whole ``--families`` dry run is ``long``, and so is loading
  their text encoders (1-layer Qwen2.5-VL-7B, 3-layer Qwen3-4B, 1-layer T5) and the Wan-2.1 VAE at full width
  through the stock loaders; the disk sums, the pruning across three runs and the packed tokenizers of the offline
  bundle are checked on fakes.
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


def _script():
    """The script as a module (its top level imports no ComfyUI)."""
    spec = importlib.util.spec_from_file_location("gpu_check_constants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


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


def test_unitune_auto_steps_are_capped_too(gpu_check):
    """UniTune's steps 0 is its recipe (256 steps on the DiTs, as the Flux.1 and SD3.5 workflows set), not off."""
    prompt = {"1": {"class_type": "FrozenTuneUniTuneFineTune", "inputs": {"steps": 0, "pivotal_steps": 0}}}
    capped, changed = gpu_check.cap_training_steps(prompt, 8)
    assert capped["1"]["inputs"] == {"steps": 8, "pivotal_steps": 0}
    assert changed == {"1 FrozenTuneUniTuneFineTune.steps": "0 -> 8"}


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


DIT_WORKFLOWS = ("UniTune - edit a photo with a prompt (Flux.1 dev)", "UniTune - edit a photo with a prompt (SD3.5)",
                 "ControlNet-Zero - train a ControlNet on a folder (Flux.1 dev)",
                 "InstantStyle - style transfer from an image (Flux.1 dev)")
FAMILY_WORKFLOWS = ("UniTune - edit a photo with a prompt (Qwen-Image)",
                    "UniTune - edit a photo with a prompt (Z-Image Turbo)")


def test_the_sd_run_takes_the_sd_workflows_and_dit_the_flux_and_sd35_ones_and_none_is_left_out(gpu_check):
    every = {p.stem for p in (REPO / "workflows").glob("*.json")}
    sd = {p.stem for p in gpu_check.workflow_files()}
    dit = {p.stem for p in gpu_check.workflow_files(dit=True)}
    families = {p.stem for p in gpu_check.workflow_files(families=True)}
    assert sd and all(s.endswith(("(SD1.5)", "(SDXL)")) for s in sd)
    assert dit == set(DIT_WORKFLOWS)
    assert families == set(FAMILY_WORKFLOWS), "issue 24: --families runs the Qwen-Image and Z-Image Turbo workflows"
    unbuilt = {p for p in every if gpu_check.workflow_base(Path(p + ".json")) in gpu_check.UNBUILT_BASES}
    assert sd | dit | families | unbuilt == every and not sd & dit and not families & (sd | dit), \
        "every example workflow runs in exactly one of the three runs, or its base is listed as not built yet"
    assert [p.stem for p in gpu_check.workflow_files([DIT_WORKFLOWS[1], DRY_RUN_WORKFLOWS[0]])] == \
        [DIT_WORKFLOWS[1], DRY_RUN_WORKFLOWS[0]], "--workflows names any of them"


def test_a_run_builds_only_the_models_its_loads_and_workflows_use(gpu_check):
    def needs(loads, stems):
        return gpu_check.model_needs(loads, gpu_check.workflow_files(list(stems)) if stems else [])

    assert needs([("sd15", "fp16")], DRY_RUN_WORKFLOWS) == {"sd15"}
    assert needs([], ["InstantStyle - style transfer from an image (SDXL)"]) == {"sdxl", "stand_ins"}
    # the Flux.1 load runs InstantStyle Apply (Flux): the XLabs adapter and CLIP ViT-L are built with it
    assert needs([("flux1", "bf16")], [DIT_WORKFLOWS[1]]) == {"flux1", "flux_style", "sd3"}
    assert needs([("sd3", "bf16")], [DIT_WORKFLOWS[1]]) == {"sd3"}
    assert needs([], ["InstantStyle - style transfer from an image (Flux.1 dev)"]) == {"flux1", "flux_style"}
    assert needs([], ["ControlNet-Zero - train a ControlNet on a folder (Flux.1 dev)"]) == {"flux1"}
    sd_run = needs(gpu_check.parse_loads(""), [p.stem for p in gpu_check.workflow_files()])
    assert sd_run == {"sd15", "sdxl", "stand_ins"}
    dit_run = needs(gpu_check.parse_loads("", dit=True), [p.stem for p in gpu_check.workflow_files(dit=True)])
    assert dit_run == {"flux1", "flux_style", "sd3"}
    # --families: Z-Image Turbo names Flux.1's ae.safetensors, which its own group builds: no Flux.1 (11.9 GB) with it
    assert needs([], [FAMILY_WORKFLOWS[1]]) == {"z_image"}
    assert needs([], [FAMILY_WORKFLOWS[0]]) == {"qwen_image"}
    assert needs([("chroma", "bf16")], []) == {"chroma"}
    families_run = needs(gpu_check.parse_loads("", families=True),
                         [p.stem for p in gpu_check.workflow_files(families=True)])
    assert families_run == {"qwen_image", "z_image", "chroma"}


def test_every_model_name_the_dit_workflows_use_has_a_built_stand_in(gpu_check):
    """The --dit server links harness.server.DIT_STAND_INS names to the files built for the workflow's family."""
    sys.path.insert(0, str(REPO / "tests"))
    from harness.server import DIT_STAND_INS

    for stem in DIT_WORKFLOWS + FAMILY_WORKFLOWS:
        (path,) = gpu_check.workflow_files([stem])
        text = path.read_text(encoding="utf-8")
        family = gpu_check.WORKFLOW_BASES[gpu_check.workflow_base(path)]
        used = [(name, item) for names in DIT_STAND_INS.values() for name, item in names.items()
                if json.dumps(name) in text]  # quoted: "ae.safetensors" is not "qwen_image_vae.safetensors"
        assert used, stem
        built = {n for group in gpu_check.model_needs([], [path]) for n in gpu_check.MODEL_GROUPS[group]}
        assert family in gpu_check.model_needs([], [path])
        for name, item in used:
            assert gpu_check.DIT_STAND_IN_FILES.get(item) in built, (stem, name, item)


def test_the_offline_bundle_packs_the_t5_and_qwen_tokenizers_the_dit_items_need(tmp_path):
    """Flux.1's, SD3's and Chroma's tokenizers build T5-XXL's (also for a checkpoint without a T5), Qwen-Image's and
    Z-Image's Qwen2.5's: they travel packed and unpack whole, once; the others are dropped."""
    sys.path.insert(0, str(REPO / "tests"))
    from harness import gpu_bundle

    encoders = tmp_path / "src" / "comfy" / "text_encoders"
    for name in ("t5_tokenizer", "llama_tokenizer", "qwen25_tokenizer"):
        (encoders / name).mkdir(parents=True)
        (encoders / name / "tokenizer.json").write_text(json.dumps({"name": name, "pad": "x" * 5000}))
    (encoders / "sd3_clip.py").write_text("")
    gpu_bundle.copy_comfyui(tmp_path / "src", tmp_path / "dest")
    dest = tmp_path / "dest" / "comfy" / "text_encoders"
    kept = sorted(p.name for p in dest.iterdir())
    assert kept == ["qwen25_tokenizer.tar.gz", "sd3_clip.py", "t5_tokenizer.tar.gz"], kept
    assert (dest / "t5_tokenizer.tar.gz").stat().st_size < 1000, "packed"
    made = gpu_bundle.unpack_tokenizers(tmp_path / "dest")
    assert sorted(p.name for p in made) == ["qwen25_tokenizer", "t5_tokenizer"]
    for name in ("qwen25_tokenizer", "t5_tokenizer"):
        assert (dest / name / "tokenizer.json").read_text() == (encoders / name / "tokenizer.json").read_text()
    assert gpu_bundle.unpack_tokenizers(tmp_path / "dest") == [], "unpacked once"
    assert not [p for p in dest.iterdir() if p.name.startswith(".")], "no half-unpacked folder left"


def test_the_offline_bundle_packs_every_tokenizer_the_dit_text_encoders_read():
    """The tokenizer folders ComfyUI 0.3.75's Flux.1, SD3, Chroma (PixArt T5), Qwen-Image and Z-Image text encoders
    open (their ``*_tokenizer`` paths) are all in the bundle: the GPU machine has no other copy."""
    sys.path.insert(0, str(REPO / "tests"))
    from harness import gpu_bundle, setup_runtime

    encoders = setup_runtime.comfyui_dir() / "comfy" / "text_encoders"
    read = set()
    for module in ("flux", "sd3_clip", "pixart_t5", "qwen_image", "z_image"):
        read |= set(re.findall(r'"(\w+_tokenizer)"', (encoders / f"{module}.py").read_text()))
    assert read and read <= set(gpu_bundle.PACKED_TOKENIZERS), read
    assert {"t5_tokenizer", "qwen25_tokenizer"} <= read


def test_loads_default_to_every_family_in_every_dtype_and_a_typo_is_refused(gpu_check):
    assert gpu_check.parse_loads("") == [("sd15", "bf16"), ("sd15", "fp16"), ("sdxl", "bf16"), ("sdxl", "fp16")]
    assert gpu_check.parse_loads("", dit=True) == [("flux1", "bf16"), ("sd3", "bf16")]
    assert gpu_check.parse_loads("", families=True) == [("qwen_image", "bf16"), ("z_image", "bf16"),
                                                         ("chroma", "bf16")]
    assert gpu_check.parse_loads(" sdxl:bf16, sd15:fp16 ") == [("sdxl", "bf16"), ("sd15", "fp16")]
    assert gpu_check.parse_loads("sd3:bf16") == [("sd3", "bf16")]
    with pytest.raises(SystemExit, match="unknown --loads sdxl:fp32; choose from sd15:bf16, sd15:fp16, "):
        gpu_check.parse_loads("sd15:bf16,sdxl:fp32")
    with pytest.raises(SystemExit, match="unknown --loads flux1:fp16; .*flux1:bf16, sd3:bf16"):
        gpu_check.parse_loads("flux1:fp16")


def _report(items: list[dict], **extra) -> dict:
    return {"mode": "full", "quick": False, "dit": True, "seconds": 400.0, "build_seconds": 80.0, "passed": 0,
            "environment": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0"},
            "unet_parameters": {"flux1": 11_901_408_320}, "full_size_layouts": None,
            "disk": {"folder": "/b/full", "built_bytes": 23 * 10**9}, "items": items, **extra}


def _item(name: str, peak_gib: float | None, target: float | None, it_per_s: float | None = 0.5) -> dict:
    return {"name": name, "kind": "trainer", "passed": True, "seconds": 9.0, "steps": 4, "it_per_s": it_per_s,
            "max_memory_allocated": None if peak_gib is None else int(peak_gib * 2**30), "node_it_per_s": {},
            "settings": {}, "outputs": [], "error": "", "memory_target_gib": target}


def test_the_report_compares_dit_peak_memory_with_the_memory_bench_targets(gpu_check, tmp_path):
    items = [_item("unitune_finetune flux1 bf16", 13.5, 16.0), _item("unitune_finetune sd3 bf16", 12.5, 12.0, 1.25),
             _item("textual_inversion flux1 bf16", 20.0, None), _item("controlnet_zero flux1 bf16", 19.5, 20.0, 0.4),
             _item("controlnet_zero sd3 bf16", 40.0, None)]
    gpu_check.write_report(tmp_path, _report(items, disk={"folder": "/b/full", "built_bytes": 23 * 10**9,
                                                          "removed": ["gpu_check_full_sdxl_v1.safetensors"]}))
    md = (tmp_path / "report.md").read_text()
    assert "target: under 600s on one H100, --dit" in md
    assert "| unitune_finetune flux1 bf16 | pass | 9.0 | 0.50 | 13.50 GiB (target ≤ 16) |" in md
    assert "- unitune_finetune flux1 bf16: 2.00 s/step, peak 13.50 GiB against ≤ 16 GiB (met; memory bench" in md
    assert "- unitune_finetune sd3 bf16: 0.80 s/step, peak 12.50 GiB against ≤ 12 GiB (**over**;" in md
    bench = gpu_check.DIT_MEMORY_BENCH_GIB["controlnet_zero", "flux1"]
    assert ("- controlnet_zero flux1 bf16: 2.50 s/step, peak 19.50 GiB against ≤ 20 GiB (met; memory bench "
            f"{bench:.3f} GiB)") in md
    assert "textual_inversion flux1 bf16:" not in md and "controlnet_zero sd3 bf16:" not in md, \
        "no target: not in the memory lines"
    assert "Disk: the files built in /b/full take 23.0 GB" in md and "limit 40 GB" in md
    assert "Removed first, the other run's cached files: gpu_check_full_sdxl_v1.safetensors." in md
    # a GPU run prints the full-size sums too (FULL_SIZE_BYTES, checked against the layouts by the dry run)
    assert "the SD run writes 16.0 GB, the DiT run 24.5 GB" in md and "together 40.5 GB, over the limit" in md
    total = sum(s for _, s in gpu_check.DIT_ESTIMATES)
    assert f"{total} s of 600 s" in md and total < gpu_check.BUDGET_SECONDS
    assert all(what in md for what, _ in gpu_check.DIT_ESTIMATES)


def test_the_families_report_judges_the_training_peak_without_the_text_encoder_left_loaded(gpu_check, tmp_path):
    """--families: the memory bench's Qwen-Image / Z-Image targets leave the text encoder out, and ComfyUI keeps it on
    the GPU after encoding when memory allows, so the verdict is on the peak less what of it stayed loaded; Chroma has
    no target and still gets its line."""
    def item(name, peak, target, resident, it_per_s=0.5):
        return {**_item(name, peak, target, it_per_s), "settings": {"text_encoder_resident_gib": resident}}

    items = [item("unitune_finetune qwen_image bf16", 25.5, 24.0, 2.9), item("unitune_finetune z_image bf16", 11.0,
                                                                           10.0, 0.5, 1.25),
             item("unitune_finetune chroma bf16", 15.0, None, 0.0, 1.0),
             _item("textual_inversion z_image bf16", 9.5, None)]
    gpu_check.write_report(tmp_path, _report(items, dit=False, families=True))
    md = (tmp_path / "report.md").read_text()
    assert "target: under 600s on one H100, --families" in md
    assert ("- unitune_finetune qwen_image bf16: 2.00 s/step, peak 25.50 GiB (text encoder still loaded: 2.90 GiB; "
            "without it 22.60 GiB) against ≤ 24 GiB (met; memory bench 22.588 GiB)") in md
    assert ("- unitune_finetune z_image bf16: 0.80 s/step, peak 11.00 GiB (text encoder still loaded: 0.50 GiB; "
            "without it 10.50 GiB) against ≤ 10 GiB (**over**; memory bench 8.718 GiB)") in md
    assert "- unitune_finetune chroma bf16: 1.00 s/step, peak 15.00 GiB (no target)" in md
    assert "- textual_inversion z_image bf16: 2.00 s/step, peak 9.50 GiB (no target)" in md
    total = sum(s for _, s in gpu_check.FAMILY_ESTIMATES)
    assert "estimates for --families on one H100" in md and f"{total} s of 600 s" in md
    assert total < gpu_check.BUDGET_SECONDS and all(what in md for what, _ in gpu_check.FAMILY_ESTIMATES)
    assert gpu_check.DIT_ESTIMATES[0][0] not in md, "the --dit run's plan is not this run's"


def test_the_textual_inversion_item_fails_on_a_wrong_key_width_or_non_finite_vector(gpu_check, tmp_path):
    """What proves Textual Inversion worked on a --families model, read back from the file it wrote: finite vectors
    under the family's key only, at the text encoder's width (the real one at full size, the config's when tiny)."""
    import torch
    from safetensors.torch import save_file

    full = SimpleNamespace(text_encoders={"qwen25_7b": {"num_hidden_layers": 1}})
    tiny = SimpleNamespace(text_encoders={"qwen3_4b": {"hidden_size": 64}, "t5xxl": {"d_model": 64}})

    def check(family, mode, tensors):
        save_file(tensors, str(tmp_path / "w.safetensors"))
        return gpu_check.check_word_file(tmp_path / "w.safetensors", family, mode)

    assert check("qwen_image", full, {"qwen25_7b": torch.zeros(2, 3584)})["embedding_shapes"] == {
        "qwen25_7b": [2, 3584]}
    assert check("chroma", tiny, {"t5xxl": torch.zeros(1, 64)})["embedding_file"] == "w.safetensors"
    assert check("flux1", tiny, {"clip_l": torch.zeros(1, 8), "t5xxl": torch.zeros(1, 64)})  # no key rule there
    for family, mode, tensors, error in (
            ("qwen_image", full, {"qwen25_7b": torch.zeros(2, 32)}, "expected qwen25_7b: \\[vectors, 3584\\]"),
            ("z_image", tiny, {"qwen3_4b": torch.zeros(1, 64), "t5xxl": torch.zeros(1, 64)}, "expected qwen3_4b"),
            ("z_image", tiny, {"qwen25_7b": torch.zeros(1, 64)}, "expected qwen3_4b"),
            ("chroma", tiny, {"t5xxl": torch.tensor([[0.0] * 63 + [float("nan")]])}, "non-finite vectors for t5xxl"),
            ("flux1", tiny, {"t5xxl": torch.full((1, 64), float("inf"))}, "non-finite vectors for t5xxl")):
        with pytest.raises(RuntimeError, match=error):
            check(family, mode, tensors)


def test_the_families_run_fits_the_disk_limit_alone_and_shares_flux_files_with_the_dit_run(gpu_check):
    """The full-size sums (FULL_SIZE_BYTES, which the dry run checks against the meta-device layouts): the --families
    run alone stays under 40 GB (Qwen-Image 20.4B, Z-Image 6.2B, Chroma 8.9B in fp8 with their cut text encoders)."""
    sizes = gpu_check.FULL_SIZE_BYTES
    files = {n for g in gpu_check.FAMILY_RUN_GROUPS for n in gpu_check.MODEL_GROUPS[g]}
    assert files == {"qwen_image", "qwen25_7b", "wan21_vae", "z_image", "qwen3_4b", "vae16", "chroma", "t5xxl"}
    total = sum(sizes[n] for n in files)
    assert 39e9 < total < gpu_check.DISK_LIMIT_BYTES, total
    assert sizes["qwen_image"] == 20_430_401_088 and sizes["z_image"] == 6_154_912_576, "fp8: a byte per weight"
    dit = {n for g in gpu_check.DIT_RUN_GROUPS for n in gpu_check.MODEL_GROUPS[g]}
    assert files & dit == {"t5xxl", "vae16"}


def test_the_families_run_removes_every_other_runs_files_but_the_ones_it_shares(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "FULL_SIZE_BYTES", {n: 100 for n in gpu_check.FULL_SIZE_BYTES})
    monkeypatch.setattr(gpu_check, "DISK_LIMIT_BYTES", 100 * 9)
    paths = _built(tmp_path, gpu_check, ["sd15", "flux1", "clip_l", "t5xxl", "vae16", "sd3", "z_image"], 100)
    removed = gpu_check.prune_other_run(paths, set(gpu_check.FAMILY_RUN_GROUPS))
    assert sorted(p.name for p in removed) == sorted(paths[n].name for n in ("sd15", "flux1", "clip_l", "sd3"))
    assert all(paths[n].exists() for n in ("t5xxl", "vae16", "z_image"))


def test_the_sd_report_has_no_dit_part(gpu_check, tmp_path):
    gpu_check.write_report(tmp_path, _report([_item("unitune_finetune sd15 fp16", 5.0, None)], dit=False))
    md = (tmp_path / "report.md").read_text()
    assert "memory bench" not in md and "Planned" not in md and "--dit" not in md


def _built(folder: Path, gpu_check, names: list[str], size: int) -> dict[str, Path]:
    paths = {n: folder / f"gpu_check_full_{n}_v1.safetensors" for g in gpu_check.MODEL_GROUPS.values() for n in g}
    for name in names:
        paths[name].write_bytes(b"x" * size)
    return paths


def test_a_run_removes_the_other_runs_cached_files_only_when_both_exceed_the_disk_limit(gpu_check, tmp_path,
                                                                                       monkeypatch):
    sd_files = [n for g in gpu_check.SD_RUN_GROUPS for n in gpu_check.MODEL_GROUPS[g]]
    dit_needs = set(gpu_check.DIT_RUN_GROUPS)
    monkeypatch.setattr(gpu_check, "FULL_SIZE_BYTES", {n: 100 for n in gpu_check.FULL_SIZE_BYTES})
    paths = _built(tmp_path, gpu_check, sd_files, 100)
    monkeypatch.setattr(gpu_check, "DISK_LIMIT_BYTES", 100 * (len(sd_files) + 7))  # exactly both runs
    assert gpu_check.prune_other_run(paths, dit_needs) == [] and all(paths[n].exists() for n in sd_files)
    monkeypatch.setattr(gpu_check, "DISK_LIMIT_BYTES", 100 * (len(sd_files) + 6))
    removed = gpu_check.prune_other_run(paths, dit_needs)
    assert sorted(removed) == sorted(paths[n] for n in sd_files) and not any(p.exists() for p in removed)
    # the reverse, and never a file the run itself uses (a run mixing both kinds of loads keeps both)
    paths = _built(tmp_path, gpu_check, ["flux1", "sd3", "clip_l", "sd15"], 100)
    monkeypatch.setattr(gpu_check, "DISK_LIMIT_BYTES", 100)
    assert set(gpu_check.prune_other_run(paths, {"sd15"})) == {paths["flux1"], paths["sd3"], paths["clip_l"]}
    paths = _built(tmp_path, gpu_check, ["flux1", "sd15"], 100)
    assert gpu_check.prune_other_run(paths, {"sd15", "flux1"}) == [] and paths["flux1"].exists()


def test_a_bad_loads_value_fails_before_any_work(tmp_path):
    done = _run("--device", "cpu", "--tiny", "--out", str(tmp_path / "report"), "--loads", "sd21:bf16")
    assert done.returncode != 0 and "unknown --loads sd21:bf16" in done.stderr, done.stderr
    assert not (tmp_path / "report").exists()


# what each family's load runs (bench/gpu_check.py FAMILY_TRAINERS), as the report must list them
SD_TRAINERS = ("unitune_finetune", "controlnet_zero")
DIT_TRAINERS = {"flux1": ("unitune_finetune", "controlnet_zero", "textual_inversion", "instantstyle_flux"),
                "sd3": ("unitune_finetune", "controlnet_zero", "textual_inversion"),
                **{f: ("unitune_finetune", "textual_inversion") for f in ("qwen_image", "z_image", "chroma")}}
MORE_DITS = ("qwen_image", "z_image", "chroma")  # --families (issue 24)
# the word file Textual Inversion writes per --families family: (key, the tiny encoder's width; real 3584, 2560, 4096)
TINY_WORDS = {"qwen_image": ("qwen25_7b", 32), "z_image": ("qwen3_4b", 64), "chroma": ("t5xxl", 64)}
# bench/memory_bench.py --full's targets for the DiT items that have one
DIT_TARGETS = {("unitune_finetune", "flux1"): 16.0, ("unitune_finetune", "sd3"): 12.0,
               ("controlnet_zero", "flux1"): 20.0, ("unitune_finetune", "qwen_image"): 24.0,
               ("unitune_finetune", "z_image"): 10.0}


def dry_run(out: Path, loads: list[str], workflows: list[str], quick: dict | None = None,
            build: Path | None = None, dit: bool = False, families: bool = False) -> dict:
    """Run the CPU dry run and check its report: every item passed, as the GPU run would report it.

    ``quick``: run ``--quick``, whose ``QUICK_TRAINERS`` this is (``loads`` / ``workflows``: what it implies).
    ``dit``: run ``--dit`` (empty ``loads`` / ``workflows``: the Flux.1-dev and SD3.5 ones); ``families``: run
    ``--families`` (empty: the Qwen-Image, Z-Image and Chroma loads, the Qwen-Image and Z-Image Turbo workflows).
    """
    args = ["--device", "cpu", "--tiny", "--out", str(out)]
    if quick:
        args += ["--quick"]
    if dit:
        args += ["--dit"]
    if families:
        args += ["--families"]
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
    loads = [tuple(x.split(":")) for x in loads] or ([(f, "bf16") for f in MORE_DITS] if families else
                                                     [("flux1", "bf16"), ("sd3", "bf16")] if dit else
                                                     [(f, d) for f in ("sd15", "sdxl") for d in ("bf16", "fp16")])
    bases = ("(Qwen-Image)", "(Z-Image Turbo)") if families else \
        ("(Flux.1 dev)", "(SD3.5)") if dit else ("(SD1.5)", "(SDXL)")  # the bases of the run
    workflows = workflows or [p.stem for p in sorted((REPO / "workflows").glob("*.json"))  # the script's order
                              if p.stem.endswith(bases)]
    trainers = {f"{family}:{dtype}": DIT_TRAINERS.get(family, SD_TRAINERS) for family, dtype in loads} | (quick or {})
    expected = [f"{kind} {family} {dtype}" for family, dtype in loads
                for kind in ("load", *trainers[f"{family}:{dtype}"])]
    assert names == expected + [f"workflow {w}" for w in workflows]
    by_name = {i["name"]: i for i in report["items"]}
    for family, dtype in loads:
        dit_load = family in ("flux1", "sd3", *MORE_DITS)  # fp8 storage computing in bf16, as on an H100
        assert by_name[f"load {family} {dtype}"]["settings"] == (
            {"unet_dtype": "float8_e4m3fn", "manual_cast": "bfloat16"} if dit_load else
            {"unet_dtype": {"bf16": "bfloat16", "fp16": "float16"}[dtype], "manual_cast": "None"})
        for trainer in trainers[f"{family}:{dtype}"]:
            item = by_name[f"{trainer} {family} {dtype}"]
            assert item["steps"] == 2 and item["it_per_s"] > 0, item
            assert item["settings"].get("steps", item["settings"].get("sampling_steps")) == 2
            assert item["max_memory_allocated"] is None  # CPU: no CUDA counter
            if dit_load and trainer != "instantstyle_flux":  # the memory bench's cases: batch 1, checkpointing
                assert item["settings"]["batch_size"] == 1 and item["settings"]["gradient_checkpointing"] is True
            if dit_load:
                assert item["memory_target_gib"] == DIT_TARGETS.get((trainer, family)), item
        if dit_load:
            tuned = by_name[f"unitune_finetune {family} {dtype}"]["settings"]
            assert tuned["train"] == "lora" and tuned.get("lora_rank") == ({"flux1": 16}.get(family)), tuned
            assert f"{family}:{dtype}" not in (quick or {})
            if family in MORE_DITS:  # what of the text encoder stayed loaded (report.md's verdict leaves it out)
                assert tuned["text_encoder_resident_gib"] >= 0 and tuned["image"] == 64, tuned
                # Textual Inversion's file, read back by the item: one vector (the node's default) under the family's
                # key at its text encoder's width (the private tokenizer's key on Qwen-Image / Z-Image)
                word = by_name[f"textual_inversion {family} {dtype}"]["settings"]
                key, width = TINY_WORDS[family]
                assert word["embedding_shapes"] == {key: [1, width]} and word["image"] == 64, word
                # a counter when an earlier run in the build folder took the name (embedding_target never overwrites)
                named = rf"gpu_check_{family}_{dtype}(_\d{{5}})?\.safetensors"
                assert re.fullmatch(named, word["embedding_file"]), word
                continue
            # ControlNet-Zero on the DiTs: 8-bit AdamW at the family's 64 px (1024 at full size); Flux.1's Create
            # copies 2 double blocks (the memory bench's case), SD3.5's takes the node's default depth
            control = by_name[f"controlnet_zero {family} {dtype}"]["settings"]
            assert control["optimizer"] == "adamw8bit" and control["resolution"] == 64, control
            assert control.get("depth") == {"flux1": 2}.get(family), control
        if family == "flux1":  # InstantStyle Apply (Flux), preset all: the styled sample differs from the plain one
            styled = by_name[f"instantstyle_flux {family} {dtype}"]["settings"]
            assert styled["preset"] == "all" and styled["max_abs_change"] > 0, styled
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
    # the --dit files, detected by ComfyUI's stock detection from their shapes (Flux, SD3): Flux.1-dev 11.90B
    # (bench/full_size.py), SD3.5 Large 8.06B; CLIP-L at full size; T5 at T5-XXL's width with 1 layer
    assert layouts["flux1_parameters"] == 11_901_408_320 and 8.0e9 < layouts["sd3_parameters"] < 8.1e9
    assert layouts["clip_l_parameters"] == 123_650_304 and layouts["t5xxl_layers"] == 1
    assert layouts["disk_bytes"]["flux1"] == layouts["flux1_parameters"], "fp8: one byte per weight"
    # InstantStyle on Flux.1: XLabs' adapter (19 double blocks, Linear(4096 -> 3072) k/v, 768 -> 4 x 4096 tokens) in
    # bf16 as published (0.98 GB); CLIP ViT-L/14 vision (24 layers, 303.97M with its projection) in fp16
    assert layouts["flux_ipadapter_double_blocks"] == 19 and layouts["flux_ipadapter_parameters"] == 490_874_880
    assert layouts["clip_vision_l_layers"] == 24 and layouts["clip_vision_l_parameters"] == 303_966_208
    assert layouts["clip_vision_l_positions"] == 257, "the stock CLIPVisionLoader's ViT-L/14 (224 px), not 336"
    assert layouts["flux_ipadapter_read_as"] == ("flux-ip-adapter.safetensors: XLabs Flux IP-Adapter, 3072-wide, 2 "
                                                 "double blocks, CLIP ViT-L/14 image_embeds (768-d)")
    assert layouts["disk_bytes"]["flux_ipadapter"] == 2 * layouts["flux_ipadapter_parameters"]
    assert layouts["disk_bytes"]["ipadapter"] < 0.71e9, "the SDXL IP-Adapter in fp16, as ip-adapter_sdxl is"
    # issue 21: under 40 GB in the build folder; both runs' files together are over it, so a run removes the other's
    # first (prune_other_run), planning with FULL_SIZE_BYTES: the layouts' own figures
    # --families (issue 24), stock detection on the shapes: Qwen-Image 20,430.4M and Z-Image 6,154.9M (bench/README's
    # memory bench), Chroma 8.9B; Qwen2.5-VL-7B and Qwen3-4B at their real widths (3584, 2560) with 1 and 3 layers
    assert layouts["qwen_image_parameters"] == 20_430_401_088 and layouts["z_image_parameters"] == 6_154_912_576
    assert 8.8e9 < layouts["chroma_parameters"] < 9.0e9
    assert (layouts["qwen25_7b_layers"], layouts["qwen25_7b_width"]) == (1, 3584)
    assert (layouts["qwen3_4b_layers"], layouts["qwen3_4b_width"]) == (3, 2560)
    assert 126e6 < layouts["wan21_vae_parameters"] < 128e6, "the Wan-2.1 VAE Qwen-Image ships (127M)"
    assert layouts["disk_bytes"] == _script().FULL_SIZE_BYTES
    assert max(layouts["disk_sd_run_bytes"], layouts["disk_dit_run_bytes"],
               layouts["disk_families_run_bytes"]) < 40 * 10**9
    md = (out / "report.md").read_text()
    assert all(n in md for n in names) and "**FAIL**" not in md
    assert "At full size: the SD run writes" in md
    assert (layouts["disk_sd_run_bytes"] + layouts["disk_dit_run_bytes"] <= 40 * 10**9) == \
        ("a run first removes the other run's cached files" not in md)
    assert (report["dit"] and "memory bench" in md) or not dit
    assert (report["families"] and "estimates for --families" in md) or not families
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
    assert sorted(t for ts in quick.values() for t in ts) == sorted(SD_TRAINERS)
    assert all(gpu_check.FAMILY_TRAINERS[f] == SD_TRAINERS for f in gpu_check.FAMILIES)
    assert all(len(ts) == 1 for ts in quick.values())
    assert [p.stem for p in gpu_check.workflow_files([gpu_check.QUICK_WORKFLOW])] == [gpu_check.QUICK_WORKFLOW]


def test_quick_refuses_a_choice_of_its_own(tmp_path):
    for extra in (("--loads", "sd15:fp16"), ("--dit",), ("--families",)):
        done = _run("--device", "cpu", "--tiny", "--quick", *extra, "--out", str(tmp_path / "r"))
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


@pytest.mark.slow
def test_cpu_dry_run_of_the_flux_load_and_the_sd35_workflow(tmp_path):
    """``--dit`` in ``make test``: Flux.1-dev through the stock UNETLoader (fp8) with UniTune, ControlNet-Zero,
    Textual Inversion and InstantStyle Apply (Flux), and the SD3.5 workflow through the server (its checkpoint built
    too); only the DiT files are built (with the XLabs adapter and CLIP ViT-L the InstantStyle item uses)."""
    by_name = dry_run(tmp_path / "gpu_check", ["flux1:bf16"], [DIT_WORKFLOWS[1]], dit=True,
                      build=tmp_path / "models")
    capped = by_name[f"workflow {DIT_WORKFLOWS[1]}"]["settings"]
    assert [v for k, v in capped.items() if k.endswith("FrozenTuneUniTuneFineTune.steps")] == ["16 -> 2"], capped
    built = sorted(p.name.rsplit("_v", 1)[0].removeprefix("gpu_check_tiny_")
                   for p in (tmp_path / "models" / "tiny").glob("*.safetensors"))
    assert built == ["clip_l", "clip_vision_l", "flux1", "flux_ipadapter", "sd3", "t5xxl", "vae16"], built
    words = [p.name for p in (tmp_path / "models" / "tiny" / "run" / "embeddings").glob("*.safetensors")]
    assert words == ["gpu_check_flux1_bf16.safetensors"], words


@pytest.mark.slow
def test_cpu_dry_run_of_the_z_image_and_chroma_loads_and_the_qwen_image_workflow(tmp_path):
    """``--families`` in ``make test``: Z-Image (stock UNETLoader fp8, CLIPLoader lumina2 on a Qwen3) and Chroma (the
    PixArt T5 CLIP) with UniTune LoRA and Textual Inversion in this process, and the Qwen-Image workflow through the
    server (UNETLoader, CLIPLoader qwen_image on a Qwen2.5-VL, the Wan-2.1 VAE): every family's files are built and
    loaded once."""
    by_name = dry_run(tmp_path / "gpu_check", ["z_image:bf16", "chroma:bf16"], [FAMILY_WORKFLOWS[0]],
                      families=True, build=tmp_path / "models")
    capped = by_name[f"workflow {FAMILY_WORKFLOWS[0]}"]["settings"]
    assert [v for k, v in capped.items() if k.endswith("FrozenTuneUniTuneFineTune.steps")] == ["16 -> 2"], capped
    built = sorted(p.name.rsplit("_v", 1)[0].removeprefix("gpu_check_tiny_")
                   for p in (tmp_path / "models" / "tiny").glob("*.safetensors"))
    assert built == ["chroma", "qwen25_7b", "qwen3_4b", "qwen_image", "t5xxl", "vae16", "wan21_vae", "z_image"], built
    words = sorted(p.name for p in (tmp_path / "models" / "tiny" / "run" / "embeddings").glob("*.safetensors"))
    assert words == ["gpu_check_chroma_bf16.safetensors", "gpu_check_z_image_bf16.safetensors"], words


@pytest.mark.long
def test_cpu_dry_run_of_everything_families_runs_writes_the_report(tmp_path):
    """The whole ``--families`` dry run: Qwen-Image, Z-Image and Chroma loads with UniTune LoRA and Textual Inversion,
    both workflows."""
    dry_run(tmp_path / "gpu_check", [], [], families=True)


FULL_WIDTH_TEXT_ENCODERS = """
import json, sys
sys.path.insert(0, "../bench")
from pathlib import Path
from harness import comfy_env
comfy_env.import_comfy(cpu=True)
import importlib.util
spec = importlib.util.spec_from_file_location("gpu_check_full_width", "../bench/gpu_check.py")
check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = check
spec.loader.exec_module(check)
import folder_paths, nodes, torch
from harness import tiny_dits
tiny_dits.install_text_encoder_shim()
mode, folder, out = check.full_mode(), Path(sys.argv[1]), {}
for name in ("qwen25_7b", "qwen3_4b", "t5xxl"):
    sd, meta = check.text_encoder_weights(mode, name, "cpu", torch.float16)
    check.save(folder / f"{name}.safetensors", sd, name, meta)
    del sd
check.save(folder / "wan21_vae.safetensors", check.wan_vae_weights(mode, "cpu", torch.float16), "wan")
folder_paths.add_model_folder_path("text_encoders", str(folder))
folder_paths.add_model_folder_path("vae", str(folder))
for name, clip_type in (("qwen25_7b", "qwen_image"), ("qwen3_4b", "lumina2"), ("t5xxl", "chroma")):
    clip = (check.chroma_clip(folder / "t5xxl.safetensors") if clip_type == "chroma" else
            nodes.CLIPLoader().load_clip(f"{name}.safetensors", clip_type)[0])
    cond = nodes.CLIPTextEncode().encode(clip, "a photo of a dog")[0][0][0]
    out[clip_type] = [type(clip.cond_stage_model).__name__, cond.shape[-1], bool(torch.isfinite(cond).all())]
    del clip
vae = nodes.VAELoader().load_vae("wan21_vae.safetensors")[0]
latent = vae.encode(torch.rand(1, 64, 64, 3))
out["vae"] = [type(vae.first_stage_model).__name__, list(latent.shape), bool(torch.isfinite(latent).all())]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.long
def test_the_families_text_encoders_and_vae_load_at_full_width_through_the_stock_loaders(tmp_path):
    """The --families files the tiny dry run cannot stand for, built as a GPU run builds them (on the CPU here: 1.8B
    parameters, ~4 GB of files): Qwen2.5-VL-7B (1 layer) through CLIPLoader qwen_image and Qwen3-4B (3 layers)
    through CLIPLoader lumina2 at their real widths, the 1-layer T5 through chroma_clip, the Wan-2.1 VAE at dim 96
    through VAELoader; each encodes to finite values of the width its diffusion model reads."""
    done = subprocess.run([sys.executable, "-c", FULL_WIDTH_TEXT_ENCODERS, str(tmp_path)], capture_output=True,
                          text=True, timeout=1200, cwd=REPO / "tests")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result == {"qwen_image": ["QwenImageTEModel_", 3584, True], "lumina2": ["ZImageTEModel_", 2560, True],
                      "chroma": ["PixArtTEModel_", 4096, True], "vae": ["WanVAE", [1, 16, 1, 8, 8], True]}, result


@pytest.mark.long
def test_cpu_dry_run_of_everything_dit_runs_writes_the_report(tmp_path):
    """The whole ``--dit`` dry run: Flux.1-dev and SD3.5 loads with their trainers and both DiT workflows."""
    dry_run(tmp_path / "gpu_check", [], [], dit=True)


@pytest.mark.long
def test_cpu_dry_run_of_everything_the_gpu_runs_writes_the_report(tmp_path):
    """The whole dry run: every load (both families in bf16 and fp16) and every example workflow."""
    by_name = dry_run(tmp_path / "gpu_check", [], [])
    capped = by_name["workflow ControlNet-Zero - train a ControlNet on a folder (SD1.5)"]["settings"]
    assert [v for k, v in capped.items() if k.endswith("FrozenTuneControlNetZeroTrain.checkpoint_every")] == \
        ["250 -> 2"], capped
