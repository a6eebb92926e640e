"""``make gpu-check``: the trainers and every example workflow on one CUDA GPU, with full-size random models.

Nothing here has run on a GPU when it was written (the project is built on a CPU-only machine), so
everything but the device is exercised by ``tests/unit/test_gpu_check.py`` through the same code on the
CPU (``--device cpu --tiny``: tiny UNets, 64 px, 2 steps; ``make test`` runs a subset, one load (SD1.5 in
fp16) and one workflow, with ``--loads`` and ``--workflows``; the whole dry run is a ``long`` test).

What it does, in one process plus one ComfyUI server:

1. Builds full-size random checkpoints ON THE GPU, in fp16, once (cached in ``build/gpu_check/``, never
   committed): SD1.5 (859.5M UNet) and SDXL (2.57B UNet), each with full-size random CLIP-L (+ CLIP-G)
   and a real-size KL VAE, which ComfyUI's loader detects as ``SD15`` / ``SDXL``; plus the stand-ins the
   InstantStyle workflows name: an SDXL IP-Adapter, a random ViT-bigG CLIP vision model and an SDXL
   ControlNet (encoder copied from the UNet).
2. Trainers, in this process: for SD1.5 at 512 px and SDXL at 1024 px, each loaded with ComfyUI's
   loader in bf16 and in fp16 (``model_options`` dtype), UniTune Fine-Tune and ControlNet-Zero
   Create + Train run a few steps. Their arguments are the nodes' schema defaults with only steps,
   sizes, seed and precision overridden (and, for SDXL, batch 1 with gradient checkpointing, plus the
   8-bit AdamW where the node offers it), so inputs added later need no change here.
3. Workflows: a headless ComfyUI on the GPU runs every ``workflows/*.json`` at its own sizes, samplers
   and batch; only training steps are capped (``--workflow-train-steps``) to stay in the time budget.
4. Writes ``out/gpu_check/report.json`` and ``report.md``: per item pass/fail, seconds, it/s (steps
   after the first, from the progress-bar updates) and ``torch.cuda.max_memory_allocated`` (reset
   before each item; the workflows' is read inside the server by ``bench/gpu_check_probe``).

``--dit``: the same for Flux.1-dev and SD3.5 Large instead, as a run of its own (10 minutes of its own: both
together do not fit one). Random full-size DiTs built on the GPU and stored in fp8 (Flux.1-dev 11.90B through the
stock ``UNETLoader`` with ``weight_dtype`` fp8_e4m3fn, as the detection reads the real file's shapes; SD3.5 Large
8.06B as a checkpoint with full-size CLIP-L + CLIP-G and no T5, which ComfyUI zero-pads, through the stock
checkpoint loader), full-size CLIP-L, a T5 at T5-XXL's real width with 1 of its 24 layers (``t5xxl_model_config``
in the file's metadata, read by the test-only text-encoder shim of ``harness.tiny_dits``: the whole T5-XXL would
add 4.4B parameters and 8.8 GB over the 40 GB disk limit, so Textual Inversion's backward through 24 T5 layers is
not measured here) and a full-size 16-channel KL VAE (Flux's ``ae`` layout). Items: the load, UniTune
Fine-Tune (LoRA, batch 1 at 1024 px, bf16, checkpointing: peak memory against the memory bench's targets),
ControlNet-Zero Create + Train (issue 23: Flux.1 in XLabs' layout with 2 double blocks, SD3.5 in diffusers' with the
node's default 12 joint blocks; batch 1 at 1024 px, bf16, 8-bit AdamW, checkpointing; Flux.1 against the memory
bench's 20 GiB), Textual Inversion Train, InstantStyle Apply (Flux) with a full-size random XLabs Flux IP-Adapter
(19 double blocks, 4096 -> 3072 k/v, bf16 as published) and CLIP ViT-L/14 vision (fp16), sampled at 1024 px with and
without it, and the DiT example workflows. Disk: the SD run's files and these together are ~40.5 GB at full size,
over the 40 GB limit, so a run first removes the other run's cached files (``prune_other_run``; report.md prints
the sums; the dry run computes them from the full-size layouts).

``--families`` (issue 24): Qwen-Image, Z-Image and Chroma, a run of its own (10 minutes; ~39.5 GB of files, which with
either other run's is over the 40 GB limit: ``prune_other_run`` removes those first but the --dit run's 1-layer T5 and
16-channel VAE, which Chroma and Z-Image share). Full-size random diffusion models built on the GPU in fp8 and found by
the stock ``UNETLoader`` detection in their shapes (no shim): Qwen-Image 20.43B (60 blocks), Z-Image 6.15B, Chroma
8.90B. Text encoders at their real widths, cut to fit the disk: Qwen2.5-VL-7B with 1 of 28 layers and no vision
weights (the stock loader still builds its 0.67B vision tower; a text prompt never runs it), Qwen3-4B with 3 of 36
(Z-Image reads layer -2), both through the stock ``CLIPLoader`` (qwen_image, lumina2) with the layer count in the
file's metadata (the text-encoder shim); Chroma's 1-layer T5 goes through ``chroma_clip`` (ComfyUI's PixArt T5 CLIP
built directly: ``CLIPLoader`` routes a T5 to Chroma only with T5-XXL's 24th layer). Not measured here, so: the text
encoders' full depth (their time and memory while encoding, and Textual Inversion's backward through them: here 1, 3
and 1 layers), ``CLIPLoader`` type chroma on a real T5-XXL, the Qwen2.5-VL vision tower's weights. VAEs: Qwen-Image's
Wan-2.1 (127M) and Flux.1's ae, full size. Items: per family the load, UniTune Fine-Tune (LoRA at the node's default
rank 32, batch 1 at 1024 px, bf16, checkpointing; Qwen-Image against the memory bench's 24 GiB, Z-Image 10 GiB, Chroma
reported without a target; ComfyUI leaves the text encoder loaded after encoding when memory allows, so report.md
judges the peak less what of it stayed) and Textual Inversion Train (batch 1 at 1024 px, bf16, checkpointing, as many
steps; its peak reported without a target; Qwen-Image and Z-Image read the word on FrozenTune's private tokenizer
copy, Chroma on the stock T5 one): the item passes when the embedding file holds finite vectors under the family's key
only, at the encoder's width (``FAMILY_WORDS``: qwen25_7b 3584, qwen3_4b 2560, t5xxl 4096); then the Qwen-Image and
Z-Image Turbo example workflows. report.md prints the FLOP-based estimates (``FAMILY_ESTIMATES``, ~430 s, not
measured) and the disk sums.

Exit code 0 if every item passed, 1 if any failed (each item runs in its own try/except, so one failure
is reported and the rest still run), 2 with a one-line reason when no CUDA GPU is visible.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # for `harness`, from any cwd
sys.path.insert(0, str(REPO / "bench"))  # for `full_size`, also when loaded by path (the unit test)

log = logging.getLogger("frozentune.gpu_check")

BUILD_VERSION = 1
SEED = 20261201
PROBE_DIR = Path(__file__).resolve().parent / "gpu_check_probe"
DTYPES = ("bf16", "fp16")
FAMILIES = ("sd15", "sdxl")
SD_LOADS = tuple(f"{family}:{dtype}" for family in FAMILIES for dtype in DTYPES)  # what the GPU run loads
# ``--dit`` (issue 22): Flux.1-dev and SD3.5 Large, weights stored in fp8 (e4m3fn), training computing in bf16
DIT_FAMILIES = ("flux1", "sd3")
DIT_LOADS = ("flux1:bf16", "sd3:bf16")
# ``--families`` (issue 24): Qwen-Image, Z-Image and Chroma, weights stored in fp8, training computing in bf16
MORE_DITS = ("qwen_image", "z_image", "chroma")
FAMILY_LOADS = tuple(f"{family}:bf16" for family in MORE_DITS)
ALL_DITS = DIT_FAMILIES + MORE_DITS
ALL_LOADS = SD_LOADS + DIT_LOADS + FAMILY_LOADS
# per family, the in-process items run on each load (issue 23: ControlNet-Zero on both DiTs, InstantStyle on Flux.1;
# issue 24: Textual Inversion on Qwen-Image, Z-Image and Chroma too)
FAMILY_TRAINERS = {"sd15": ("unitune_finetune", "controlnet_zero"), "sdxl": ("unitune_finetune", "controlnet_zero"),
                   "flux1": ("unitune_finetune", "controlnet_zero", "textual_inversion", "instantstyle_flux"),
                   "sd3": ("unitune_finetune", "controlnet_zero", "textual_inversion"),
                   **{family: ("unitune_finetune", "textual_inversion") for family in MORE_DITS}}
# issue 24: what Textual Inversion Train's file must hold per --families family: its text encoder's embedding key (the
# one ComfyUI's tokenizer looks up; Qwen-Image's and Z-Image's read on FrozenTune's private tokenizer copy) and that
# encoder's token width at full size (the tiny dry run's is its text-encoder config's: ``word_width``)
FAMILY_WORDS = {"qwen_image": ("qwen25_7b", 3584), "z_image": ("qwen3_4b", 2560), "chroma": ("t5xxl", 4096)}
# bench/memory_bench.py --full's targets at 1024 px, batch 1, fp8 weights, bf16, checkpointing: UniTune LoRA, and
# ControlNet-Zero Flux.1-dev (XLabs layout, 2 double blocks, 8-bit AdamW; issue 23). SD3.5's ControlNet has none.
DIT_MEMORY_TARGETS_GIB = {("unitune_finetune", "flux1"): 16.0, ("unitune_finetune", "sd3"): 12.0,
                          ("controlnet_zero", "flux1"): 20.0,
                          # issue 24: the node's default LoRA (rank 32); Chroma has no target (its peak is reported)
                          ("unitune_finetune", "qwen_image"): 24.0, ("unitune_finetune", "z_image"): 10.0}
# ControlNet-Zero Create's depth on Flux.1: the XLabs releases' 2 double blocks (the memory bench's case); SD3.5 takes
# the node's default (diffusers' SD3 ControlNet: 12 joint blocks)
DIT_CONTROLNET_DEPTH = {"flux1": 2}
DIT_LORA_RANK = {"flux1": 16}  # the memory bench's Flux case (issue 22); SD3.5: the node's default (32)
BUDGET_SECONDS = 600  # issue 21: the whole run, model build included, under 10 minutes on one H100
DISK_LIMIT_BYTES = 40 * 10**9  # issue 21: disk under 40 GB in the build folder the SD and --dit runs share (prune_other_run)
# Estimates for ``--dit`` on one H100, before any GPU ran it (seconds; report.md prints them beside the measured
# run). Random init on the GPU is seconds (12B normal draws); writing is safetensors moving each tensor to the
# host then one file write (~1 GB/s assumed); steps from FLOPs: Flux.1-dev at 1024 px is ~110 TFLOP per image
# forward (2 x 11.9B x 4608 tokens), ~0.4 s on an H100 (~30% of its bf16 peak; not measured here); a
# checkpointed training step is ~4 forwards, a textual-inversion step ~3 (no weight gradients); SD3.5 Large
# ~68 TFLOP (2 x 8.1B x 4173 tokens), ~0.25 s.
DIT_ESTIMATES = (
    ("build Flux.1-dev (fp8, 11.9 GB) + CLIP-L + 1-layer T5-XXL + 16-ch VAE (1.1 GB)", 45),
    ("build SD3.5 Large checkpoint (fp8, 8.1 GB + CLIP-L/G and VAE 1.8 GB)", 35),
    ("load Flux.1-dev + UniTune LoRA 4 steps (~1.6 s/step) + Textual Inversion 4 steps (~1.2 s/step)", 60),
    ("load SD3.5 Large + UniTune LoRA 4 steps (~1.0 s/step) + Textual Inversion 4 steps (~0.8 s/step)", 45),
    ("server start", 20),
    ("workflow Flux.1 dev: load, 8 training steps at batch 2, 25 edit steps x 2 predictions x batch 2, 1024 px", 110),
    ("workflow SD3.5: load, 8 training steps at batch 2, 27 edit steps x 3 predictions x batch 2, 1024 px", 90),
    # issue 23: a ControlNet-Zero step is the base's checkpointed forward and backward (~4 forwards) plus the
    # ControlNet's (2 of 19 double blocks on Flux.1, 0.72B weights; 12 of 38 joint blocks on SD3.5, 2.6B weights,
    # copied to fp32 on the host by Create); sampling at 1024 px ~0.45 s/step (Flux.1-dev, cfg 1)
    ("build XLabs Flux IP-Adapter (bf16, 0.98 GB) + CLIP ViT-L/14 vision (fp16, 0.61 GB)", 5),
    ("Flux.1-dev ControlNet-Zero: Create (2 double blocks) + encode + 4 steps at 1024 px (~1.9 s/step)", 20),
    ("Flux.1-dev InstantStyle Apply (Flux) + 4 sampling steps at 1024 px, without and with the adapter", 12),
    ("SD3.5 Large ControlNet-Zero: Create (12 joint blocks) + encode + 4 steps at 1024 px (~1.3 s/step)", 25),
    ("workflow ControlNet-Zero (Flux.1 dev): encode 16 images, 8 steps x 4 accumulated at 1024 px (~60 s), "
     "checkpoint + Save, 20 steps with the stock ControlNet loader", 90),
    ("workflow InstantStyle (Flux.1 dev): CLIP ViT-L + XLabs adapter, 20 steps at 1024 px, decode", 25),
)
# The same for ``--families`` (issue 24; FLOP-based, not measured): Qwen-Image at 1024 px is ~170 TFLOP per image
# forward (2 x 20.4B x ~4,100 tokens), ~0.6 s at ~30% of an H100's bf16 peak; Z-Image ~50 TFLOP (2 x 6.15B x ~4,100),
# ~0.17 s; Chroma ~75 TFLOP (2 x 8.9B x ~4,200), ~0.25 s; a checkpointed LoRA step ~4 forwards, a textual-inversion
# step ~3 (no weight gradients; its backward through the 1- or 3-layer text encoder is noise beside the DiT's), on the
# load the LoRA item used, plus the VAE encode at 1024 px and the file's fingerprints. Writing at the --dit build's pace
# (~3.5 s per GB, random init included); loading from the page cache.
FAMILY_ESTIMATES = (
    ("build Qwen-Image (fp8, 20.4 GB) + 1-layer Qwen2.5-VL-7B (1.6 GB) + Wan-2.1 VAE (0.25 GB)", 78),
    ("build Z-Image (fp8, 6.2 GB) + 3-layer Qwen3-4B (1.4 GB)", 27),
    ("build Chroma (fp8, 8.9 GB) + 1-layer T5-XXL + 16-ch VAE (0.8 GB; kept from a --dit run if cached)", 34),
    ("load Qwen-Image + UniTune LoRA 4 steps at 1024 px (~2.3 s/step)", 40),
    ("load Z-Image + UniTune LoRA 4 steps at 1024 px (~0.7 s/step)", 15),
    ("load Chroma + UniTune LoRA 4 steps at 1024 px (~1.0 s/step)", 20),
    ("Qwen-Image Textual Inversion (qwen25_7b word): encode + 4 steps at 1024 px (~1.8 s/step)", 15),
    ("Z-Image Textual Inversion (qwen3_4b word): encode + 4 steps at 1024 px (~0.5 s/step)", 8),
    ("Chroma Textual Inversion (t5xxl word): encode + 4 steps at 1024 px (~0.75 s/step)", 10),
    ("server start", 20),
    ("workflow Qwen-Image: load, 8 training steps at batch 2, 18 edit steps x 3 predictions x batch 2, 1024 px", 130),
    ("workflow Z-Image Turbo: load, 8 training steps at batch 2, 8 edit steps x 2 predictions x batch 2, 1024 px", 35),
)
QUICK_BUDGET_SECONDS = 240  # issue 21: ``--quick`` in 4 minutes
# ``--quick``: one trainer item per family (both trainers and both dtypes still covered) and one workflow.
QUICK_TRAINERS = {"sd15:fp16": ("unitune_finetune",), "sdxl:bf16": ("controlnet_zero",)}
QUICK_WORKFLOW = "UniTune - edit a photo with a prompt (SD1.5)"
# the files each workflow's stand-ins need beyond the checkpoints (see ``stand_in``); trainers need checkpoints only
STAND_INS = ("ipadapter", "clip_vision", "controlnet")

# The full-size UNets, as comfy/model_detection.py spells them (unet_config_from_diffusers_unet: SD15, SDXL).
SD15_UNET = dict(
    model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, adm_in_channels=None,
)
SDXL_UNET = dict(
    model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, context_dim=2048, num_heads=-1, num_head_channels=64,
    use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
)
# The VAE every SD1.5/SDXL checkpoint carries (comfy/sd.py's default KL ddconfig).
KL_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)


@dataclass(frozen=True)
class Mode:
    """Sizes of one run: ``full`` on the GPU, ``tiny`` for the CPU dry run of the same code."""

    name: str
    unets: dict[str, dict]  # family -> UNet kwargs (DiTs: ComfyUI's unet_config, as detect_unet_config gives it)
    detected: dict[str, str]  # family -> class name in comfy.supported_models the loader must pick
    sizes: dict[str, int]  # family -> training image side in pixels
    train_steps: int
    workflow_train_steps: int
    batch_size: int | None = None  # None: the node's default (SDXL: 1)
    # text encoder -> ComfyUI model_config entries over its stock full-size config ({}: the stock one), written
    # into the file's metadata for the text-encoder shim (harness.tiny_dits.TE_OPTIONS_KEY)
    text_encoders: dict[str, dict] = field(default_factory=dict)
    # tiny Flux, Qwen-Image, Z-Image, Chroma (CONFIG_IN_FILE): detection reads the unet_config from the file, as
    # ComfyUI's fixes their widths (Flux/Chroma 24 heads of 128, Qwen-Image 3072 wide, Z-Image 3840)
    flux_config_in_file: bool = False
    wan_vae_dim: int = 96  # Qwen-Image's Wan-2.1 VAE (comfy/sd.py reads the width from decoder.head.0.gamma)


# The T5 the --dit run builds: T5-XXL's real width (d_model 4096, which Flux.1's txt_in and SD3's context take)
# with 1 of its 24 layers, 0.33B parameters instead of 4.76B (the disk limit: see report.md's disk line). ComfyUI
# reads the layer count from the file's metadata through the text-encoder shim (the stock DualCLIPLoader always
# builds 24 layers).
T5_LAYERS = {"num_layers": 1}
# ``--families``' text encoders at their real widths (Qwen-Image's joint width 3584, Z-Image's caption width 2560), cut
# to what the disk limit leaves (report.md's disk line): Qwen2.5-VL-7B with 1 of its 28 layers (0.78B parameters of
# 7.6B; no vision weights in the file: ComfyUI's loader builds its 0.67B vision tower anyway and a text prompt never
# runs it) and Qwen3-4B with 3 of its 36 (Z-Image reads layer -2, and comfy/sd1_clip.py asserts |-2| < the layer
# count). Chroma takes the 1-layer T5 above.
QWEN25_LAYERS = {"num_hidden_layers": 1}
QWEN3_LAYERS = {"num_hidden_layers": 3}


def full_mode(train_steps: int = 4, workflow_train_steps: int = 8) -> Mode:
    from full_size import CHROMA_FULL, FLUX_DEV_FULL, QWEN_IMAGE_FULL, SD35_LARGE_FULL, Z_IMAGE_FULL

    return Mode("full", {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "flux1": FLUX_DEV_FULL, "sd3": SD35_LARGE_FULL,
                         "qwen_image": QWEN_IMAGE_FULL, "z_image": Z_IMAGE_FULL, "chroma": CHROMA_FULL},
                {"sd15": "SD15", "sdxl": "SDXL", "flux1": "Flux", "sd3": "SD3", "qwen_image": "QwenImage",
                 "z_image": "ZImage", "chroma": "Chroma"},
                {"sd15": 512, "sdxl": 1024, **{f: 1024 for f in ALL_DITS}}, train_steps, workflow_train_steps,
                text_encoders={"clip_l": {}, "clip_g": {}, "t5xxl": dict(T5_LAYERS), "qwen25_7b": dict(QWEN25_LAYERS),
                               "qwen3_4b": dict(QWEN3_LAYERS)})


def tiny_mode() -> Mode:
    # SDXL_BLOCKS has SDXL's block ids, which the InstantStyle presets need
    from harness import tiny_dits, tiny_dits2, tiny_models, tiny_qwen, tiny_stand_ins2

    dits = {f: tiny_dits.RECIPES[f] for f in (*DIT_FAMILIES, "chroma")}
    return Mode("tiny", {"sd15": tiny_models.SD15.unet, "sdxl": tiny_models.SDXL_BLOCKS.unet,
                         **{f: r.unet for f, r in dits.items()},
                         "qwen_image": tiny_qwen.UNET_CONFIG, "z_image": tiny_dits2.ZIMAGE_UNET},
                {"sd15": tiny_models.SD15.expected_config, "sdxl": tiny_models.SDXL_BLOCKS.expected_config,
                 **{f: r.config_class for f, r in dits.items()}, "qwen_image": "QwenImage", "z_image": "ZImage"},
                {"sd15": 64, "sdxl": 64, **{f: 64 for f in ALL_DITS}}, 2, 2, batch_size=1,
                text_encoders={"clip_l": tiny_dits.CLIP_CONFIG, "clip_g": tiny_dits.CLIP_CONFIG,
                               "t5xxl": tiny_dits.T5_CONFIG, "qwen25_7b": tiny_stand_ins2.QWEN25_CONFIG,
                               "qwen3_4b": tiny_dits2.QWEN3_CONFIG},
                flux_config_in_file=True, wan_vae_dim=tiny_qwen.VAE_DIM)


# --- results ---------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One line of the report."""

    name: str
    kind: str  # "load" | "trainer" | "workflow"
    passed: bool = False
    seconds: float = 0.0
    steps: int | None = None
    it_per_s: float | None = None
    max_memory_allocated: int | None = None  # bytes, None on the CPU
    node_it_per_s: dict[str, float] = field(default_factory=dict)  # workflows: per node that reported steps
    settings: dict = field(default_factory=dict)  # what was set on top of the schema / workflow values
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    memory_target_gib: float | None = None  # the memory bench's target for this case, where it has one


def steps_per_second(times: list[float]) -> float | None:
    """Steps per second between the first and last progress update (the first step is warm-up)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:600]}"


def run_item(item: Item, fn: Callable[[], dict], device: str) -> Item:
    """Run ``fn`` as ``item``: time it, measure peak CUDA memory, and record a failure instead of raising."""
    cuda = device == "cuda"
    if cuda:
        _cuda_counter(reset=True)
    start = time.perf_counter()
    try:
        found = fn() or {}
        if cuda:
            import torch

            torch.cuda.synchronize()  # an asynchronous CUDA error belongs to this item
        item.passed = True
    except Exception as err:  # noqa: BLE001 - one failing item must not stop the others
        found = {}
        item.error = one_line(err)
        log.error("FAIL %s: %s\n%s", item.name, item.error, traceback.format_exc())
    item.seconds = round(time.perf_counter() - start, 2)
    if cuda:
        item.max_memory_allocated = _cuda_counter(reset=False)
        _empty_cache(device)  # what a failed item left behind must not fail the next one
    for key, value in found.items():
        setattr(item, key, value)
    log.info("%-4s %-40s %7.1fs  %s it/s  peak %s", "OK" if item.passed else "FAIL", item.name, item.seconds,
             _fmt(item.it_per_s), _gib(item.max_memory_allocated))
    return item


def _cuda_counter(reset: bool) -> int | None:
    """Reset, or read, ``torch.cuda.max_memory_allocated``; None if CUDA is in an error state."""
    import torch

    try:
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()
            return None
        return torch.cuda.max_memory_allocated()
    except RuntimeError as err:
        log.error("CUDA peak-memory counter unavailable: %s", one_line(err))
        return None


def exit_code(items: list[Item]) -> int:
    return 0 if items and all(i.passed for i in items) else 1


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


# --- random full-size weights, built on the device ----------------------------------------------------------

def random_weights(module, seed: int, dtype, device: str) -> dict:
    """Seeded random values for every tensor of ``module`` (on the meta device), made on ``device``.

    The same rules as ``harness.tiny_models.random_state_dict`` (norms 1/0, biases 0, matrices
    N(0, 1/fan_in), embeddings N(0, 0.02), one stream per tensor name), but drawn on the GPU so a
    2.6B-parameter UNet takes seconds and no host memory.
    """
    import torch

    from harness.tiny_models import _norm_param_names

    norms = _norm_param_names(module)
    out = {}
    for name, ref in module.state_dict().items():
        shape = ref.shape
        if device == "meta":  # the layout only (full_size_layouts)
            out[name] = torch.empty(shape, device="meta", dtype=ref.dtype if name.endswith("position_ids") else dtype)
            continue
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1], device=device).expand(shape).clone()
            continue
        if name in norms or len(shape) < 2:
            one = name.endswith("weight") if name in norms else not name.endswith("bias")
            t = torch.ones(shape, device=device) if one else torch.zeros(shape, device=device)
        elif name.endswith("logit_scale"):
            t = torch.full(shape, 4.6052, device=device)
        else:
            gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
            std = 0.02 if "embedding" in name else shape[1:].numel() ** -0.5
            t = torch.empty(shape, device=device).normal_(0.0, std, generator=gen)
        out[name] = t.to(dtype)
    return out


def build_checkpoint(unet_kwargs: dict, expected: str, device: str, dtype) -> dict:
    """A checkpoint state dict (UNet, VAE, text encoders) in the layout CheckpointLoaderSimple reads."""
    import comfy.model_detection
    import comfy.ops
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, use_checkpoint=False, use_spatial_transformer=True, legacy=False,
                     dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init, **unet_kwargs)
    sd = {"model.diffusion_model." + k: v for k, v in random_weights(unet, SEED, dtype, device).items()}
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    found = type(config).__name__ if config is not None else None
    if found != expected:
        raise RuntimeError(f"the random UNet is detected as {found}, expected {expected}")
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=KL_VAE, embed_dim=4)
    sd.update(config.process_vae_state_dict_for_saving(random_weights(vae, SEED + 1, dtype, device)))
    clip = config.clip_target(state_dict=sd).clip(device="meta", dtype=dtype, model_options={})
    sd.update(config.process_clip_state_dict_for_saving(random_weights(clip, SEED + 2, dtype, device)))
    return sd


def clip_vision_weights(tiny: bool, device: str, dtype) -> dict:
    """ViT-bigG (comfy/clip_vision_config_g.json) at full size, or the harness's tiny one."""
    import comfy.clip_model
    import comfy.ops
    import torch

    from harness import tiny_ipadapter

    path = (tiny_ipadapter.CLIP_VISION_CONFIG_PATH if tiny
            else Path(comfy.clip_model.__file__).parent / "clip_vision_config_g.json")
    config = json.loads(Path(path).read_text())
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return random_weights(model, SEED + 3, dtype, device)


def controlnet_weights(checkpoint_sd: dict, device: str, dtype) -> dict:
    """A ControlNet in ComfyUI's ldm layout for this checkpoint: encoder copied from its UNet, the rest random."""
    import comfy.cldm.cldm
    import comfy.model_detection
    import comfy.ops
    import torch

    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v for k, v in checkpoint_sd.items() if k.startswith(prefix)}
    config = dict(comfy.model_detection.model_config_from_unet(unet, "").unet_config)
    config.pop("out_channels", None)
    with torch.device("meta"):
        cn = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                        **{**config, "dtype": torch.float32})
    sd = random_weights(cn, SEED + 4, dtype, device)
    sd.update({k: unet[k] for k in sd if k in unet})
    return sd


# --- Flux.1-dev and SD3.5 (``--dit``) ------------------------------------------------------------------------

DIT_FILES = {"flux1": ("flux1", "clip_l", "t5xxl", "vae16"), "sd3": ("sd3",)}  # what each DiT family's build writes
# ``--families``: (diffusion model, text encoder, VAE) per family; Z-Image and Chroma share Flux.1's ae (``vae16``),
# Chroma the --dit run's 1-layer T5
FAMILY_FILES = {"qwen_image": ("qwen_image", "qwen25_7b", "wan21_vae"), "z_image": ("z_image", "qwen3_4b", "vae16"),
                "chroma": ("chroma", "t5xxl", "vae16")}
# InstantStyle on Flux.1 (issue 23): an XLabs Flux IP-Adapter and the CLIP ViT-L/14 vision model it reads, built
# when a Flux.1 load runs (its instantstyle_flux item) or a workflow names them (harness.server.DIT_STAND_INS)
FLUX_STYLE_FILES = ("flux_ipadapter", "clip_vision_l")
XLABS_TOKENS = 4  # x-flux ImageProjModel(clip_extra_context_tokens=4)
KL16_VAE = dict(KL_VAE, z_channels=16)  # Flux.1's ae / SD3's VAE: the SD KL layout, 16 latent channels, no quant convs


def dit_weights(mode: Mode, family: str, device: str, dtype, metadata: dict) -> dict:
    """``family``'s diffusion model (bare ComfyUI keys) with random weights stored in ``dtype`` (fp8 on the GPU).

    Checked against ComfyUI's detection as the loaders will run it: from the shapes alone at full size (the
    tiny Flux, Qwen-Image, Z-Image and Chroma read their config from ``metadata``, see ``harness.tiny_dits``), to
    the expected config class.
    """
    import comfy.model_detection
    import torch

    from harness import tiny_dits

    config_class = mode.detected[family]
    module = tiny_dits._meta_diffusion_model(config_class, mode.unets[family])
    sd = random_weights(module, SEED + 5 + ALL_DITS.index(family), dtype, device)
    if "pos_embed" in sd and device != "meta":  # SD3's fixed 2-D sin-cos table, not a learned one
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

        n, dim = sd["pos_embed"].shape[1:]
        table = torch.from_numpy(get_2d_sincos_pos_embed(dim, int(round(n ** 0.5))))
        sd["pos_embed"] = table.to(device=device, dtype=torch.float32).unsqueeze(0).to(dtype)
    if family in CONFIG_IN_FILE and mode.flux_config_in_file:
        tiny_shims()
        metadata[tiny_dits.CONFIG_KEY] = json.dumps(mode.unets[family])
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=metadata or None)
    found = type(config).__name__ if config is not None else None
    if found != config_class:
        raise RuntimeError(f"the random {family} diffusion model is detected as {found}, expected {config_class}")
    return sd


CONFIG_IN_FILE = ("flux1", *MORE_DITS)  # the tiny files whose unet_config detection reads from their metadata
TEXT_ENCODER_NAMES = ("clip_l", "clip_g", "t5xxl", "qwen25_7b", "qwen3_4b")


def tiny_shims() -> None:
    """The test-only shims the tiny files need in this process (they answer only for files carrying their metadata):
    ``harness.tiny_dits``' detection shim, and ``tests/harness/tiny_dit_node``'s ZImage class for a Z-Image below
    3840 wide and 1-block vision tower for a tiny Qwen2.5-VL (what the e2e server installs)."""
    import importlib

    from harness import tiny_dits

    tiny_dits.install_detection_shim()
    importlib.import_module("harness.tiny_dit_node")


def text_encoder_weights(mode: Mode, name: str, device: str, dtype) -> tuple[dict, dict]:
    """A text encoder (``TEXT_ENCODER_NAMES``; the keys CLIPLoader/DualCLIPLoader read) and its file metadata: the
    ``model_options`` that build it when it is not the stock full size (``mode.text_encoders``)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.qwen_image
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.z_image
    import torch

    from harness import tiny_dits

    config = dict(mode.text_encoders.get(name, {}))
    kw = {"device": "meta", "dtype": torch.float16}
    if name == "clip_l":
        module = comfy.sd1_clip.SDClipModel(model_options={"clip_l_model_config": dict(config)}, **kw).transformer
        options = {"model_config": config}  # long_clipl.py overwrites "clip_l_model_config" (harness.tiny_dits)
    elif name == "clip_g":
        module = comfy.sdxl_clip.SDXLClipG(model_options={"clip_g_model_config": dict(config)}, **kw).transformer
        options = {"model_config": config}
    elif name in ("qwen25_7b", "qwen3_4b"):
        options = {f"{name}_model_config": config}
        cls = (comfy.text_encoders.qwen_image.Qwen25_7BVLIModel if name == "qwen25_7b"
               else comfy.text_encoders.z_image.Qwen3_4BModel)
        # the language model only (``model.*``): no vision weights for Qwen2.5-VL (see QWEN25_LAYERS)
        module = cls(model_options={"model_name": name, **options}, **kw).transformer.model
        seed = SEED + 10 + TEXT_ENCODER_NAMES.index(name)
        sd = {f"model.{k}": v for k, v in random_weights(module, seed, dtype, device).items()}
        return sd, ({tiny_dits.TE_OPTIONS_KEY: json.dumps(options)} if config else {})
    else:
        module = comfy.text_encoders.sd3_clip.T5XXLModel(model_options={"t5xxl_model_config": dict(config)},
                                                         **kw).transformer
        options = {"t5xxl_model_config": config}
    metadata = {tiny_dits.TE_OPTIONS_KEY: json.dumps(options)} if config else {}
    return random_weights(module, SEED + 10 + TEXT_ENCODER_NAMES.index(name), dtype, device), metadata


def kl16_vae_weights(device: str, dtype) -> dict:
    """A full-size 16-channel KL VAE (``encoder.*``/``decoder.*``), which ``comfy.sd.VAE`` builds as Flux's ae."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    block = "comfy.ldm.modules.diffusionmodules.model."
    with torch.device("meta"):
        vae = AutoencodingEngine(regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                                 encoder_config={"target": block + "Encoder", "params": KL16_VAE},
                                 decoder_config={"target": block + "Decoder", "params": KL16_VAE})
    return random_weights(vae, SEED + 6, dtype, device)


def wan_vae_weights(mode: Mode, device: str, dtype) -> dict:
    """Qwen-Image's VAE: the Wan-2.1 VAE (``mode.wan_vae_dim``: 96 as published, 8 tiny), whose keys and width the
    stock ``VAELoader`` reads (as ``harness.tiny_qwen`` builds its tiny one)."""
    import comfy.ldm.wan.vae
    import torch

    with torch.device("meta"):
        vae = comfy.ldm.wan.vae.WanVAE(dim=mode.wan_vae_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                       attn_scales=[], temperal_downsample=[False, True, True])
    sd = random_weights(vae, SEED + 9, dtype, device)
    # its RMS_norm scales are [C, 1, 1(, 1)], not 1-D: ones, as a norm's weight (random_weights would draw them)
    return {k: torch.ones_like(v) if k.endswith(".gamma") and device != "meta" else v for k, v in sd.items()}


def sd3_checkpoint_weights(mode: Mode, device: str, dtype) -> tuple[dict, dict]:
    """SD3.5 as CheckpointLoaderSimple reads it: the MMDiT in ``dtype`` (fp8 on the GPU), the 16-channel VAE and
    CLIP-L + CLIP-G in fp16, no T5 (as checkpoints that ship only the two CLIPs: ComfyUI zero-pads the context)."""
    import torch

    from harness import tiny_dits

    sd = {f"model.diffusion_model.{k}": v for k, v in dit_weights(mode, "sd3", device, dtype, {}).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in kl16_vae_weights(device, torch.float16).items()})
    options = {}
    for name in ("clip_l", "clip_g"):
        te, meta = text_encoder_weights(mode, name, device, torch.float16)
        sd.update({f"text_encoders.{name}.transformer.{k}": v for k, v in te.items()})
        if meta:  # per CLIP: the checkpoint loader has no long_clipl step mapping "model_config" to each
            options[f"{name}_model_config"] = dict(mode.text_encoders[name])
    return sd, ({tiny_dits.TE_OPTIONS_KEY: json.dumps(options)} if options else {})


def flux_ipadapter_weights(mode: Mode, device: str, dtype) -> dict:
    """An XLabs Flux IP-Adapter (``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj`` per double
    block, Linear(context -> hidden), and ``ip_adapter_proj_model``: Linear(768 -> 4 x context) + LayerNorm) for
    ``mode``'s Flux; stored in ``dtype`` (bf16 at full size, as XLabs' flux-ip-adapter.safetensors, 0.98 GB).

    k/v are random, not zero as a fresh x-flux adapter: the image attention must act on the sample. The tiny one is
    ``harness.tiny_flux_ipadapter``'s (sized for the tiny Flux and its 64-d CLIP vision stand-in).
    """
    import torch

    from harness import tiny_flux_ipadapter

    if mode.name == "tiny" and device != "meta":
        return {k: v.to(dtype) for k, v in tiny_flux_ipadapter.xlabs_state_dict().items()}
    unet = mode.unets["flux1"]
    hidden, context, double = unet["hidden_size"], unet["context_in_dim"], unet["depth"]
    embed = json.loads(_clip_vision_l_config(mode.name == "tiny").read_text())["projection_dim"]
    shapes = {"ip_adapter_proj_model.proj.weight": (XLABS_TOKENS * context, embed),
              "ip_adapter_proj_model.proj.bias": (XLABS_TOKENS * context,),
              "ip_adapter_proj_model.norm.weight": (context,), "ip_adapter_proj_model.norm.bias": (context,)}
    for i in range(double):
        for which in ("k", "v"):
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{which}_proj."
            shapes[p + "weight"], shapes[p + "bias"] = (hidden, context), (hidden,)
    out = {}
    for name, shape in shapes.items():
        if device == "meta":
            out[name] = torch.empty(shape, device="meta", dtype=dtype)
        elif len(shape) < 2:  # LayerNorm weight 1, biases 0 (random_weights' rules)
            out[name] = (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, device=device).to(dtype)
        else:
            gen = torch.Generator(device=device).manual_seed(SEED + 7 + zlib.crc32(name.encode()))
            out[name] = torch.empty(shape, device=device).normal_(0.0, shape[1] ** -0.5, generator=gen).to(dtype)
    return out


def _clip_vision_l_config(tiny: bool) -> Path:
    import comfy.clip_model

    from harness import tiny_flux_ipadapter

    return (tiny_flux_ipadapter.clip_vision_l_config_path() if tiny
            else Path(comfy.clip_model.__file__).parent / "clip_vision_config_vitl.json")


def clip_vision_l_weights(tiny: bool, device: str, dtype) -> dict:
    """CLIP ViT-L/14 vision (comfy/clip_vision_config_vitl.json: 24 layers, 768-d image_embeds) at full size, which
    the stock CLIPVisionLoader detects from ``layers.22`` and 257 positions; or the harness's tiny 64-d one."""
    import comfy.clip_model
    import comfy.ops
    import torch

    config = json.loads(_clip_vision_l_config(tiny).read_text())
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return random_weights(model, SEED + 8, dtype, device)


def build_flux_style(mode: Mode, paths: dict[str, Path], device: str) -> None:
    import torch

    if not paths["flux_ipadapter"].exists():
        save(paths["flux_ipadapter"], flux_ipadapter_weights(mode, device, torch.bfloat16),
             f"{mode.name} xlabs flux ipadapter")
    if not paths["clip_vision_l"].exists():
        save(paths["clip_vision_l"], clip_vision_l_weights(mode.name == "tiny", device, torch.float16),
             f"{mode.name} clip vision vit-l")


def build_dit(mode: Mode, family: str, paths: dict[str, Path], device: str) -> None:
    """Write ``family``'s files (``DIT_FILES``) that are missing; the diffusion models in fp8 at full size."""
    import torch

    weights = torch.float8_e4m3fn  # the stock loaders' fp8_e4m3fn storage, also for the tiny CPU dry run
    if family in MORE_DITS:
        build_more_dit(mode, family, paths, device, weights)
        return
    if family == "sd3":
        if not paths["sd3"].exists():
            sd, meta = sd3_checkpoint_weights(mode, device, weights)
            save(paths["sd3"], sd, f"{mode.name} sd3 random", meta)
        return
    if not paths["flux1"].exists():
        meta: dict = {}
        sd = dit_weights(mode, "flux1", device, weights, meta)
        save(paths["flux1"], sd, f"{mode.name} flux1 random", meta)
        del sd
        _empty_cache(device)
    for name in ("clip_l", "t5xxl"):
        if not paths[name].exists():
            sd, meta = text_encoder_weights(mode, name, device, torch.float16)
            save(paths[name], sd, f"{mode.name} {name} random", meta)
    if not paths["vae16"].exists():
        save(paths["vae16"], kl16_vae_weights(device, torch.float16), f"{mode.name} 16-channel VAE random")


def build_more_dit(mode: Mode, family: str, paths: dict[str, Path], device: str, weights) -> None:
    """``--families``: ``family``'s files (``FAMILY_FILES``) that are missing; the diffusion model in ``weights``
    (fp8), the text encoders in fp16, the VAEs in fp16 (shared ``t5xxl``/``vae16`` files are the --dit run's)."""
    import torch

    diffusion, text_encoder, vae = FAMILY_FILES[family]
    if not paths[diffusion].exists():
        meta: dict = {}
        sd = dit_weights(mode, family, device, weights, meta)
        save(paths[diffusion], sd, f"{mode.name} {family} random", meta)
        del sd
        _empty_cache(device)
    if not paths[text_encoder].exists():
        sd, meta = text_encoder_weights(mode, text_encoder, device, torch.float16)
        save(paths[text_encoder], sd, f"{mode.name} {text_encoder} random", meta)
    if not paths[vae].exists():
        sd = wan_vae_weights(mode, device, torch.float16) if vae == "wan21_vae" else kl16_vae_weights(device,
                                                                                                     torch.float16)
        save(paths[vae], sd, f"{mode.name} {vae} random")


def save(path: Path, sd: dict, note: str, metadata: dict | None = None) -> Path:
    """Atomic safetensors write; safetensors moves GPU tensors to the host one at a time."""
    from harness.tiny_ipadapter import _save

    return _save(path, sd, {"frozentune_gpu_check": note, **(metadata or {})})


def build_models(mode: Mode, folder: Path, device: str, needs: set[str],
                 removed: list[Path] | None = None) -> dict[str, Path]:
    """The files of the groups in ``needs`` (``MODEL_GROUPS``: "sd15", "sdxl", "stand_ins", "flux1", "sd3") for
    ``mode``, built if missing (cached in ``folder``).

    Returns ``{name: path}`` for every name, built or not: a run builds only what its loads and workflows use
    (``--quick`` runs no InstantStyle workflow, so it skips the stand-ins, about 5 GB of the full-size build:
    the ViT-bigG and the SDXL ControlNet; the SD run builds no DiT, ``--dit`` no SD model).
    """
    import torch

    from harness import tiny_ipadapter

    paths = {name: folder / f"gpu_check_{mode.name}_{name}_v{BUILD_VERSION}.safetensors"
             for group in MODEL_GROUPS.values() for name in group}
    if "stand_ins" in needs:
        needs = needs | {"sdxl"}  # the stand-ins are built from the SDXL checkpoint
    if mode.name == "full":  # ``removed``: what prune_other_run removed, for the report
        (removed if removed is not None else []).extend(prune_other_run(paths, needs))
    dtype = torch.float16
    for family in ("sd15", "sdxl"):
        if family not in needs:
            continue
        stand_ins = family == "sdxl" and "stand_ins" in needs
        needed = [paths[family]] + ([paths["controlnet"]] if stand_ins else [])
        if all(p.exists() for p in needed):
            continue
        start = time.perf_counter()
        sd = build_checkpoint(mode.unets[family], mode.detected[family], device, dtype)
        if not paths[family].exists():
            save(paths[family], sd, f"{mode.name} {family} random")
        if stand_ins:
            save(paths["controlnet"], controlnet_weights(sd, device, dtype), f"{mode.name} sdxl controlnet")
        del sd
        _empty_cache(device)
        log.info("built %s %s in %.1fs: %s", mode.name, family, time.perf_counter() - start, paths[family])
    if "stand_ins" in needs:
        if not paths["ipadapter"].exists():
            layers = tiny_ipadapter.attn2_shapes(paths["sdxl"])
            # fp16, as the published ip-adapter_sdxl.safetensors (0.70 GB at full size; fp32 would take 1.41)
            save(paths["ipadapter"], {k: v.half() for k, v in tiny_ipadapter.ipadapter_state_dict(layers, 1280).items()},
                 f"{mode.name} sdxl ipadapter")
        if not paths["clip_vision"].exists():
            save(paths["clip_vision"], clip_vision_weights(mode.name == "tiny", device, dtype),
                 f"{mode.name} clip vision")
            _empty_cache(device)
    for family in ALL_DITS:
        if family in needs:
            start = time.perf_counter()
            build_dit(mode, family, paths, device)
            _empty_cache(device)
            log.info("built %s %s in %.1fs: %s", mode.name, family, time.perf_counter() - start, paths[family])
    if "flux_style" in needs:
        start = time.perf_counter()
        build_flux_style(mode, paths, device)
        log.info("built %s XLabs Flux IP-Adapter + CLIP ViT-L in %.1fs", mode.name, time.perf_counter() - start)
    return paths


# Bytes of each full-size file as the GPU runs write it (``full_size_layouts()["disk_bytes"]``, which the dry-run
# test checks this against): what ``prune_other_run`` plans with before anything is built.
FULL_SIZE_BYTES = {
    "sd15": 2_132_470_614, "sdxl": 6_937_676_352, "controlnet": 2_502_028_320, "clip_vision": 3_689_814_528,
    "ipadapter": 702_562_304, "flux1": 11_901_408_320, "sd3": 9_950_540_422, "clip_l": 247_300_608,
    "t5xxl": 649_097_216, "vae16": 167_639_366, "flux_ipadapter": 981_749_760, "clip_vision_l": 607_932_416,
    "qwen_image": 20_430_401_088, "z_image": 6_154_912_576, "chroma": 8_899_983_424, "qwen25_7b": 1_556_117_504,
    "qwen3_4b": 1_383_502_336, "wan21_vae": 253_785_062,
}


def prune_other_run(paths: dict[str, Path], needs: set[str]) -> list[Path]:
    """Remove the other runs' cached files (the SD run's and ``--families``' for ``--dit``, and so on: every file this
    run does not use) when keeping them would take the build folder over ``DISK_LIMIT_BYTES``: the SD and DiT runs'
    together are ~40.5 GB at full size, ``--families`` alone ~39 GB, so the folder holds one run's files and a run
    after another rebuilds its own (its build is inside its time budget). Returns what was removed."""
    ours = {name for group in needs for name in MODEL_GROUPS[group]}
    others = list(dict.fromkeys(paths[n] for names in MODEL_GROUPS.values() for n in names
                                if n not in ours and paths[n].exists()))
    kept = sum(p.stat().st_size for p in others)
    planned = sum(paths[n].stat().st_size if paths[n].exists() else FULL_SIZE_BYTES.get(n, 0) for n in ours)
    if not others or kept + planned <= DISK_LIMIT_BYTES:
        return []
    for path in others:
        path.unlink()
    log.info("removed the other run's cached files (%.1f GB; with this run's %.1f GB they exceed %.0f GB): %s",
             kept / 1e9, planned / 1e9, DISK_LIMIT_BYTES / 1e9, ", ".join(p.name for p in others))
    return others


# What each build group writes (``build_models``), by ``paths`` name.
MODEL_GROUPS = {"sd15": ("sd15",), "sdxl": ("sdxl",), "stand_ins": STAND_INS, **DIT_FILES,
                "flux_style": FLUX_STYLE_FILES, **FAMILY_FILES}
SD_RUN_GROUPS = ("sd15", "sdxl", "stand_ins")
DIT_RUN_GROUPS = (*DIT_FAMILIES, "flux_style")
FAMILY_RUN_GROUPS = MORE_DITS
RUN_GROUPS = {"SD": SD_RUN_GROUPS, "DiT": DIT_RUN_GROUPS, "--families": FAMILY_RUN_GROUPS}


def model_needs(loads: list[tuple[str, str]], workflows: list[Path]) -> set[str]:
    """The build groups the trainer ``loads`` and the ``workflows`` use: a workflow's base family, plus the
    InstantStyle stand-ins where it names one of their files (``harness.server.STAND_INS``)."""
    from harness import server

    needs = {family for family, _ in loads}
    needs |= {"flux_style" for family, _ in loads if "instantstyle_flux" in FAMILY_TRAINERS[family]}
    stand_in_names = [n for folder, names in server.STAND_INS.items() if folder != "checkpoints" for n in names]
    group_of: dict[str, str] = {}
    for group, names in MODEL_GROUPS.items():  # a shared file (t5xxl, vae16) belongs to its first group: Flux.1's
        for name in names:
            group_of.setdefault(name, group)
    for path in workflows:
        needs.add(WORKFLOW_BASES[workflow_base(path)])
        text = path.read_text(encoding="utf-8")
        if any(name in text for name in stand_in_names):
            needs.add("stand_ins")
        built = {n for group in needs for n in MODEL_GROUPS[group]}  # Z-Image's ae is its own group's: no Flux.1
        needs |= {group_of[DIT_STAND_IN_FILES[item]] for names in server.DIT_STAND_INS.values()
                  for name, item in names.items() if json.dumps(name) in text and item in DIT_STAND_IN_FILES
                  and DIT_STAND_IN_FILES[item] not in built}
    return needs


def full_size_layouts() -> dict:
    """Build every full-size file's layout on the meta device (no memory, no time): what a GPU run builds.

    The CPU dry run reports this, so the full-size configs are checked against ComfyUI's detection here too.
    """
    import torch

    from harness import tiny_dits, tiny_ipadapter

    mode, dtype = full_mode(), torch.float16
    out: dict = {}
    disk = {}  # file -> bytes of its tensors at full size, as a GPU run writes it
    for family in ("sd15", "sdxl"):
        sd = build_checkpoint(mode.unets[family], mode.detected[family], "meta", dtype)
        out[f"{family}_unet_parameters"] = _parameters(sd, "model.diffusion_model.")
        out[f"{family}_tensors"] = len(sd)
        disk[family] = _bytes(sd)
    layers = [(v.shape[0], v.shape[1]) for k, v in sd.items() if tiny_ipadapter._ATTN2.match(k)]
    out["sdxl_attn2_layers"] = len(layers)
    controlnet = controlnet_weights(sd, "meta", dtype)
    out["sdxl_controlnet_parameters"] = _parameters(controlnet, "")
    disk["controlnet"] = _bytes(controlnet)
    vision = clip_vision_weights(False, "meta", dtype)
    out["clip_vision_parameters"] = _parameters(vision, "")
    out["clip_vision_layers"] = sum(1 for k in vision if k.endswith("layer_norm1.weight"))
    disk["clip_vision"] = _bytes(vision)
    # fp16, as build_models writes it: to_k_ip/to_v_ip per attn2 layer and the 4-token projection from ViT-bigG's 1280
    disk["ipadapter"] = 2 * (sum(2 * inner * context for inner, context in layers) + 4 * layers[0][1] * (1280 + 1))
    # the --dit run's files: stock detection (no shim answers: no metadata) must find Flux / SD3 in the shapes
    with tiny_dits.without_detection_shim():
        flux = dit_weights(mode, "flux1", "meta", torch.float8_e4m3fn, {})
        sd3, _ = sd3_checkpoint_weights(mode, "meta", torch.float8_e4m3fn)
    out["flux1_parameters"] = _parameters(flux, "")
    # parameters only, as published (8.1B): not the 2-D sin-cos table it stores (pos_embed, 89.6M values)
    out["sd3_parameters"] = _parameters(sd3, "model.diffusion_model.") - sd3["model.diffusion_model.pos_embed"].numel()
    disk["flux1"], disk["sd3"] = _bytes(flux), _bytes(sd3)
    for name in ("clip_l", "t5xxl"):
        te, _ = text_encoder_weights(mode, name, "meta", torch.float16)
        out[f"{name}_parameters"] = _parameters(te, "")
        disk[name] = _bytes(te)
    disk["vae16"] = _bytes(kl16_vae_weights("meta", torch.float16))
    out["t5xxl_layers"] = sum(1 for k in te if k.endswith("layer.0.SelfAttention.q.weight"))
    # InstantStyle on Flux.1: XLabs' adapter in bf16 (its published file: 0.98 GB) and CLIP ViT-L/14 vision in fp16
    adapter = flux_ipadapter_weights(mode, "meta", torch.bfloat16)
    out["flux_ipadapter_parameters"] = _parameters(adapter, "")
    out["flux_ipadapter_double_blocks"] = sum(1 for k in adapter if k.endswith("double_stream_k_proj.weight"))
    vision_l = clip_vision_l_weights(False, "meta", torch.float16)
    out["clip_vision_l_parameters"] = _parameters(vision_l, "")
    out["clip_vision_l_layers"] = sum(1 for k in vision_l if k.endswith("layer_norm1.weight"))
    # what the stock CLIPVisionLoader reads to pick ViT-L/14 (comfy/clip_vision.py: layers.22, 257 positions, 1024 wide)
    out["clip_vision_l_positions"] = vision_l["vision_model.embeddings.position_embedding.weight"].shape[0]
    disk["flux_ipadapter"], disk["clip_vision_l"] = _bytes(adapter), _bytes(vision_l)
    try:  # the pack's own XLabs reader (Flux IP-Adapter Loader) on the full-size builder's values at Flux.1's widths
        # (it reads values, so not on the meta device: 2 of the 19 double blocks, 63M values on the host)
        from frozentune.instantstyle import flux_adapter_file

        two = dataclasses.replace(mode, unets={**mode.unets, "flux1": {**mode.unets["flux1"], "depth": 2}})
        out["flux_ipadapter_read_as"] = flux_adapter_file.describe(flux_adapter_file.from_flat(
            flux_ipadapter_weights(two, "cpu", torch.bfloat16), "flux-ip-adapter.safetensors"))
    except ImportError:  # full_size_layouts without the pack imported (main imports it first)
        out["flux_ipadapter_read_as"] = None
    # --families: Qwen-Image, Z-Image, Chroma found by stock detection in the shapes; their text encoders and VAE
    with tiny_dits.without_detection_shim():
        for family in MORE_DITS:
            sd = dit_weights(mode, family, "meta", torch.float8_e4m3fn, {})
            out[f"{family}_parameters"] = _parameters(sd, "")
            disk[family] = _bytes(sd)
    for name in ("qwen25_7b", "qwen3_4b"):
        te, _ = text_encoder_weights(mode, name, "meta", torch.float16)
        out[f"{name}_parameters"] = _parameters(te, "")
        out[f"{name}_layers"] = sum(1 for k in te if k.endswith("self_attn.q_proj.weight"))
        out[f"{name}_width"] = te["model.embed_tokens.weight"].shape[1]
        disk[name] = _bytes(te)
    wan = wan_vae_weights(mode, "meta", torch.float16)
    out["wan21_vae_parameters"] = _parameters(wan, "")
    disk["wan21_vae"] = _bytes(wan)
    out["disk_bytes"] = disk
    run_files = {run: list(dict.fromkeys(n for g in groups for n in MODEL_GROUPS[g]))
                 for run, groups in RUN_GROUPS.items()}
    out["disk_sd_run_bytes"] = sum(disk[k] for k in run_files["SD"])
    out["disk_dit_run_bytes"] = sum(disk[k] for k in run_files["DiT"])
    out["disk_families_run_bytes"] = sum(disk[k] for k in run_files["--families"])
    return out


def _parameters(sd: dict, prefix: str) -> int:
    return sum(v.numel() for k, v in sd.items() if k.startswith(prefix) and v.is_floating_point())


def _bytes(sd: dict) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


# where each built file keeps its diffusion model's tensors (the Flux.1 file is a bare diffusion model)
UNET_PREFIX = {"sd15": "model.diffusion_model.", "sdxl": "model.diffusion_model.", "flux1": "",
               "sd3": "model.diffusion_model.", **{family: "" for family in MORE_DITS}}


def unet_parameters(path: Path, prefix: str = "model.diffusion_model.") -> int:
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _empty_cache(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        with contextlib.suppress(RuntimeError):  # a CUDA error state is reported by the item that caused it
            torch.cuda.empty_cache()


# --- trainers, in this process ------------------------------------------------------------------------------

def schema_defaults(node_cls) -> dict:
    """``{input id: default}`` of a V3 node (a combo without a default: its first option)."""
    out = {}
    for inp in node_cls.define_schema().inputs:
        default = getattr(inp, "default", None)
        if default is None and getattr(inp, "options", None):
            default = inp.options[0]
        if default is not None:
            out[inp.id] = default
    return out


def schema_arguments(node_cls, given: dict, overrides: dict) -> tuple[dict, dict]:
    """Every input of a V3 node: ``given`` values, else ``overrides`` (if the input exists and, for a combo,
    offers that value), else its schema default. Returns ``(arguments, overrides applied)``.

    Inputs the node gains later get their defaults; overrides for inputs it lacks are skipped.
    """
    schema = node_cls.define_schema()
    defaults = schema_defaults(node_cls)
    args, applied = {}, {}
    for inp in schema.inputs:
        name = inp.id
        options = getattr(inp, "options", None)
        if name in given:
            args[name] = given[name]
        elif name in overrides and (not options or overrides[name] in options):
            args[name] = applied[name] = overrides[name]
        elif name in defaults:
            args[name] = defaults[name]
        elif not inp.optional:
            raise ValueError(f"{schema.node_id} input {name!r} has no default: gpu_check must give it a value")
    return args, applied


class StepClock:
    """A ComfyUI progress-bar hook that records when each update happened."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, value, total, preview_image, prompt_id=None, node_id=None) -> None:
        self.times.append(time.perf_counter())


@contextlib.contextmanager
def progress_hook(hook) -> Iterator[None]:
    import comfy.utils

    stock = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(stock)


def images(count: int, size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.rand(count, size, size, 3, generator=gen)


def precision_overrides(dtype_name: str) -> dict:
    """The trainers' precision inputs, whichever name a node uses."""
    return {"precision": dtype_name, "mixed_precision": dtype_name}


def run_unitune(models: tuple, family: str, dtype_name: str, mode: Mode) -> dict:
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    model, clip, vae = models
    overrides = {"steps": mode.train_steps, "seed": 0, **precision_overrides(dtype_name)}
    if family != "sd15":  # SDXL at 1024 px fits consumer cards at batch 1 with checkpointing (the bench's case)
        overrides.update(batch_size=1, gradient_checkpointing=True)
    if family in ALL_DITS:  # the memory bench's DiT cases: LoRA, its rank
        overrides.update(train="lora", **({"lora_rank": DIT_LORA_RANK[family]} if family in DIT_LORA_RANK else {}))
    if mode.batch_size:
        overrides["batch_size"] = mode.batch_size
    given = dict(model=model, clip=clip, vae=vae, image=images(1, mode.sizes[family], 1))
    args, applied = schema_arguments(UniTuneFineTune, given, overrides)
    clock = StepClock()
    with progress_hook(clock):
        tuned, curve = UniTuneFineTune.execute(**args).args[:2]
    if not tuned.patches:
        raise RuntimeError("UniTune Fine-Tune returned a MODEL without trained patches")
    del tuned, curve
    settings = {**applied, "image": mode.sizes[family]}
    if family in MORE_DITS:  # the memory bench's targets leave the text encoder out: what of it stayed loaded
        settings["text_encoder_resident_gib"] = round(resident_bytes(clip.patcher) / 2**30, 3)
    return {"steps": len(clock.times), "it_per_s": steps_per_second(clock.times), "settings": settings,
            "memory_target_gib": DIT_MEMORY_TARGETS_GIB.get(("unitune_finetune", family))}


def resident_bytes(patcher) -> int:
    """Bytes of ``patcher``'s weights ComfyUI holds loaded on its device now (0 when it was unloaded): on a GPU the
    text encoder encoded the prompt there and stays unless ComfyUI needed the memory, so the item's peak holds it."""
    import comfy.model_management as mm

    return patcher.loaded_size() if any(m is patcher for m in mm.loaded_models()) else 0


def run_textual_inversion(models: tuple, family: str, dtype_name: str, mode: Mode) -> dict:
    """Textual Inversion Train (the DiTs: vectors for CLIP-L and T5, or CLIP-L and CLIP-G; Qwen-Image, Z-Image and
    Chroma: for their one text encoder, see ``FAMILY_WORDS``), batch 1 at the family's size, the text encoders and the
    DiT checkpointed; writes the embedding file, whose vectors must be finite (and for ``FAMILY_WORDS`` families be
    the one key at the encoder's width)."""
    from frozentune.nodes.textual_inversion_nodes import TextualInversionTrain

    model, clip, vae = models
    overrides = {"steps": mode.train_steps, "seed": 0, "batch_size": 1, "gradient_checkpointing": True,
                 **precision_overrides(dtype_name)}
    given = dict(model=model, clip=clip, vae=vae, image=images(1, mode.sizes[family], 4),
                 name=f"gpu_check_{family}_{dtype_name}")
    args, applied = schema_arguments(TextualInversionTrain, given, overrides)
    clock = StepClock()
    with progress_hook(clock):
        word, curve, path = TextualInversionTrain.execute(**args).args[:3]
    if not Path(path).is_file():
        raise RuntimeError(f"Textual Inversion Train wrote no file for {word}")
    del curve
    return {"steps": len(clock.times), "it_per_s": steps_per_second(clock.times),
            "settings": {**applied, "image": mode.sizes[family], **check_word_file(Path(path), family, mode)}}


def word_width(mode: Mode, key: str, full_width: int) -> int:
    """The token width of text encoder ``key`` in ``mode``: its config's (the tiny ones), else the real one."""
    config = mode.text_encoders.get(key, {})
    return int(config.get("hidden_size", config.get("d_model", full_width)))


def check_word_file(path: Path, family: str, mode: Mode) -> dict:
    """What proves Textual Inversion Train worked, read back from its file: finite vectors, and for ``FAMILY_WORDS``
    families exactly the family's key at its encoder's width (a file the stock or private tokenizer reads)."""
    import safetensors
    import torch

    with safetensors.safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v.float()).all()]
    if not tensors or bad:
        what = "non-finite vectors for " + ", ".join(bad) if tensors else "no vectors"
        raise RuntimeError(f"{path.name}: {what}")
    found = {k: list(v.shape) for k, v in tensors.items()}
    if family in FAMILY_WORDS:
        key, full_width = FAMILY_WORDS[family]
        width = word_width(mode, key, full_width)
        if list(found) != [key] or len(found[key]) != 2 or found[key][1] != width:
            raise RuntimeError(f"{path.name} holds {found}, expected {key}: [vectors, {width}]")
    return {"embedding_file": path.name, "embedding_shapes": found}


def run_controlnet_zero(models: tuple, family: str, dtype_name: str, mode: Mode) -> dict:
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroCreate, ControlNetZeroTrain

    model, clip, vae = models
    create_overrides = {"depth": DIT_CONTROLNET_DEPTH[family]} if family in DIT_CONTROLNET_DEPTH else {}
    create_args, create_applied = schema_arguments(ControlNetZeroCreate, {"model": model}, create_overrides)
    control_net = ControlNetZeroCreate.execute(**create_args).args[0]
    size = mode.sizes[family]
    overrides = {"steps": mode.train_steps, "resolution": size, "seed": 0, "checkpoint_every": 0,
                 "run_name": f"gpu_check_{family}_{dtype_name}", "resume": False, **precision_overrides(dtype_name)}
    if family != "sd15":  # 1024 px, batch 1, 8-bit AdamW where offered (the bench's SDXL and Flux.1-dev cases)
        overrides.update(batch_size=1, gradient_checkpointing=True, optimizer="adamw8bit")
    if mode.batch_size:
        overrides["batch_size"] = mode.batch_size
    batch = overrides.get("batch_size", schema_defaults(ControlNetZeroTrain).get("batch_size", 1))
    hints = (images(batch, size, 3) > 0.5).float()
    given = dict(model=model, clip=clip, vae=vae, control_net=control_net, dataset_folder="",
                 images=images(batch, size, 2), hints=hints, captions="a photo of a red disk")
    args, applied = schema_arguments(ControlNetZeroTrain, given, overrides)
    clock = StepClock()
    with progress_hook(clock):
        trained, curve = ControlNetZeroTrain.execute(**args).args[:2]
    if trained is None:
        raise RuntimeError("ControlNet-Zero Train returned no CONTROL_NET")
    del trained, curve, control_net
    return {"steps": len(clock.times), "it_per_s": steps_per_second(clock.times),
            "settings": {**create_applied, **applied, "images": batch},
            "memory_target_gib": DIT_MEMORY_TARGETS_GIB.get(("controlnet_zero", family))}


def run_instantstyle_flux(models: tuple, family: str, dtype_name: str, mode: Mode, paths: dict[str, Path],
                          device: str) -> dict:
    """InstantStyle Apply (Flux) with the XLabs IP-Adapter (Flux IP-Adapter Loader) and CLIP ViT-L/14 (the stock
    loader), preset ``all``, then ``mode.train_steps`` Euler steps at the family's size with FluxGuidance 3.5 and
    the same seed, once without and once with the adapter: the styled sample must differ (the adapter acts), and
    the styled run's it/s and peak memory are the item's."""
    import comfy.clip_vision
    import comfy.utils
    import folder_paths
    import node_helpers
    import nodes
    import torch

    from frozentune.nodes.instantstyle_nodes import FluxIPAdapterLoader, InstantStyleApplyFlux

    model, clip, _ = models
    folder_paths.add_model_folder_path("ipadapter", str(paths["flux_ipadapter"].parent))
    adapter = FluxIPAdapterLoader.execute(paths["flux_ipadapter"].name).args[0]
    if mode.name == "tiny":  # the stock loader knows only full-size layouts (harness.tiny_flux_ipadapter)
        vision = comfy.clip_vision.ClipVisionModel(str(_clip_vision_l_config(True)))
        vision.load_sd(comfy.utils.load_torch_file(str(paths["clip_vision_l"])))
    else:
        vision = comfy.clip_vision.load(str(paths["clip_vision_l"]))
    size = mode.sizes[family]
    given = dict(model=model, flux_ipadapter=adapter, clip_vision=vision, image=images(1, 224, 5))
    args, applied = schema_arguments(InstantStyleApplyFlux, given, {"preset": "all"})
    styled = InstantStyleApplyFlux.execute(**args).args[0]
    tokens, pooled = clip.encode_from_tokens(clip.tokenize("a lighthouse on a cliff at dusk"), return_pooled=True)
    positive = node_helpers.conditioning_set_values([[tokens, {"pooled_output": pooled}]], {"guidance": 3.5})
    negative = [[torch.zeros_like(tokens), {"pooled_output": torch.zeros_like(pooled)}]]
    latent = torch.zeros(1, 16, size // 8, size // 8)  # EmptySD3LatentImage's (Flux.1: 16 channels, 1/8 size)
    samples, clock = [], StepClock()
    for which in (model, styled):
        if which is styled and device == "cuda":
            _cuda_counter(reset=True)  # the item's peak: the styled run's
        with progress_hook(clock if which is styled else StepClock()):
            samples.append(nodes.common_ksampler(which, 0, mode.train_steps, 1.0, "euler", "simple", positive,
                                                 negative, {"samples": latent})[0]["samples"].float().cpu())
    if torch.equal(samples[0], samples[1]):
        raise RuntimeError("InstantStyle Apply (Flux) left the sample unchanged: the adapter did not act")
    del styled, vision, adapter
    return {"steps": len(clock.times), "it_per_s": steps_per_second(clock.times),
            "settings": {**applied, "image": size, "sampling_steps": mode.train_steps,
                         "max_abs_change": round(float((samples[1] - samples[0]).abs().max()), 4)}}


TRAINERS: dict[str, Callable[..., dict]] = {
    "unitune_finetune": run_unitune,
    "controlnet_zero": run_controlnet_zero,
    "textual_inversion": run_textual_inversion,
    "instantstyle_flux": run_instantstyle_flux,
}
NEEDS_FILES = ("instantstyle_flux",)  # items that also take the built files and the device


def release_models(device: str) -> None:
    import comfy.model_management as mm

    try:
        mm.unload_all_models()
        mm.soft_empty_cache()
    except RuntimeError as err:  # the next items will report the device's state
        log.error("releasing the models failed: %s", one_line(err))
    _empty_cache(device)


def load_dit(paths: dict[str, Path], family: str, dtype_name: str, device: str) -> tuple:
    """``(MODEL, CLIP, VAE)`` of a DiT through ComfyUI's stock loaders, weights stored in fp8 (e4m3fn).

    Flux.1: ``UNETLoader`` with ``weight_dtype`` fp8_e4m3fn, ``DualCLIPLoader`` (flux), ``VAELoader``; SD3.5:
    the checkpoint through ``load_checkpoint_guess_config`` (what ``CheckpointLoaderSimple`` calls) with
    ``dtype`` fp8_e4m3fn, what UNETLoader's weight_dtype sets. Qwen-Image / Z-Image: ``UNETLoader`` (fp8_e4m3fn),
    ``CLIPLoader`` (qwen_image / lumina2), ``VAELoader``; Chroma: ``UNETLoader``, ``chroma_clip``, ``VAELoader``. On a
    GPU ComfyUI computes in bf16 by itself; on the CPU ``computing_in`` makes it do the same instead of its fp32 cast.
    """
    import comfy.sd
    import folder_paths
    import nodes
    import torch

    from harness import tiny_dits
    from harness.precision import DTYPE_NAMES, computing_in

    tiny_dits.install_detection_shim()  # both answer only for files with their metadata keys (the tiny files,
    tiny_dits.install_text_encoder_shim()  # the 1-layer T5): the full-size DiTs load through stock detection
    if device == "cpu":  # the tiny files (a Z-Image below 3840 wide, a tiny Qwen2.5-VL): see tiny_shims
        tiny_shims()
    compute = DTYPE_NAMES[dtype_name]
    ctx = computing_in(tiny_dits.FP8, compute) if device == "cpu" else contextlib.nullcontext()
    with ctx:
        if family in MORE_DITS:
            diffusion, text_encoder, vae_name = FAMILY_FILES[family]
            for kind, name in (("diffusion_models", diffusion), ("text_encoders", text_encoder), ("vae", vae_name)):
                folder_paths.add_model_folder_path(kind, str(paths[name].parent))
            model = nodes.UNETLoader().load_unet(paths[diffusion].name, "fp8_e4m3fn")[0]
            if family == "chroma":
                clip = chroma_clip(paths[text_encoder])
            else:
                clip_type = {"qwen_image": "qwen_image", "z_image": "lumina2"}[family]
                clip = nodes.CLIPLoader().load_clip(paths[text_encoder].name, clip_type)[0]
            vae = nodes.VAELoader().load_vae(paths[vae_name].name)[0]
        elif family == "flux1":
            for kind, name in (("diffusion_models", "flux1"), ("text_encoders", "clip_l"),
                               ("text_encoders", "t5xxl"), ("vae", "vae16")):
                folder_paths.add_model_folder_path(kind, str(paths[name].parent))
            model = nodes.UNETLoader().load_unet(paths["flux1"].name, "fp8_e4m3fn")[0]
            clip = nodes.DualCLIPLoader().load_clip(paths["clip_l"].name, paths["t5xxl"].name, "flux")[0]
            vae = nodes.VAELoader().load_vae(paths["vae16"].name)[0]
        else:
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(
                str(paths[family]), output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"),
                model_options={"dtype": torch.float8_e4m3fn})[:3]
    return model, clip, vae


def chroma_clip(path: Path):
    """Chroma's CLIP (ComfyUI's PixArt T5 tokenizer and encoder: what ``CLIPLoader`` type chroma builds for a T5-XXL)
    on the T5 file at ``path``, its layer count from the file's metadata (``harness.tiny_dits.TE_OPTIONS_KEY``).

    Not through ``CLIPLoader``: ComfyUI routes a T5 to Chroma's encoder only when it has T5-XXL's 24th layer
    (``comfy.sd.detect_te_model``) and reads a 1-layer one as T5-base; so this builds the ``comfy.sd.CLIP`` as
    ``load_text_encoder_state_dicts`` builds it for a T5-XXL (as ``harness.tiny_dits`` does for the tiny one).
    """
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5
    import comfy.utils
    import folder_paths

    from harness import tiny_dits

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer,
                                                    comfy.text_encoders.pixart_t5.pixart_te())
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=comfy.utils.calculate_parameters(sd), model_options=tiny_dits.te_options_of([path]))
    missing, _ = clip.load_sd(sd)
    if missing:
        raise RuntimeError(f"Chroma's T5 from {path.name}: missing {missing[:3]}")
    return clip


def trainer_items(mode: Mode, paths: dict[str, Path], family: str, dtype_name: str, device: str,
                  trainers: tuple[str, ...] | None = None) -> list[Item]:
    """Load one model in one dtype, then run ``trainers`` (default: the family's ``FAMILY_TRAINERS``) on it."""
    from harness.precision import DTYPE_NAMES, load_checkpoint

    loaded: dict = {}

    def load() -> dict:
        if family in ALL_DITS:
            loaded["models"] = load_dit(paths, family, dtype_name, device)
        else:  # on the CPU, compute natively in half precision as a GPU does (harness.precision)
            loaded["models"] = load_checkpoint(paths[family], DTYPE_NAMES[dtype_name], native=device == "cpu")
        model = loaded["models"][0].model
        found = type(model.model_config).__name__
        if found != mode.detected[family]:
            raise RuntimeError(f"the {family} file loaded as {found}, expected {mode.detected[family]}")
        return {"settings": {"unet_dtype": str(model.get_dtype()).removeprefix("torch."),
                             "manual_cast": str(model.manual_cast_dtype).removeprefix("torch.")}}

    items = [run_item(Item(f"load {family} {dtype_name}", "load"), load, device)]
    for trainer, fn in TRAINERS.items():
        if trainer not in (trainers if trainers is not None else FAMILY_TRAINERS[family]):
            continue
        item = Item(f"{trainer} {family} {dtype_name}", "trainer")
        if "models" in loaded:
            extra = (paths, device) if trainer in NEEDS_FILES else ()
            run_item(item, functools.partial(fn, loaded["models"], family, dtype_name, mode, *extra), device)
        else:
            item.error = "not run: the checkpoint did not load"
        items.append(item)
    loaded.clear()
    return items


def parse_loads(text: str, dit: bool = False, families: bool = False) -> list[tuple[str, str]]:
    """``"sd15:fp16,sdxl:bf16"`` -> ``[("sd15", "fp16"), ("sdxl", "bf16")]``; empty: every SD family in every
    dtype (``SD_LOADS``), with ``dit`` the Flux.1-dev and SD3.5 loads (``DIT_LOADS``), with ``families`` the
    Qwen-Image, Z-Image and Chroma ones (``FAMILY_LOADS``).

    A subset is how the CPU dry run in CI checks the wiring of every family and every dtype without the
    cost of all four loads (the full dry run is the ``long`` test).
    """
    names = [n.strip() for n in text.split(",") if n.strip()] or list(FAMILY_LOADS if families else
                                                                      DIT_LOADS if dit else SD_LOADS)
    unknown = [n for n in names if n not in ALL_LOADS]
    if unknown:
        raise SystemExit(f"gpu-check: unknown --loads {', '.join(unknown)}; choose from {', '.join(ALL_LOADS)}")
    return [tuple(n.split(":")) for n in names]


def run_trainers(mode: Mode, paths: dict[str, Path], device: str,
                 loads: list[tuple[str, str]] | None = None,
                 only: dict[str, tuple[str, ...]] | None = None) -> list[Item]:
    """Every trainer on each load, or per ``"family:dtype"`` of ``only`` just the trainers it names."""
    import torch

    items = []
    for family, dtype_name in loads or parse_loads(""):  # noqa: B020 - loads, not the loop's names
        trainers = None if only is None else only[f"{family}:{dtype_name}"]
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            items += trainer_items(mode, paths, family, dtype_name, device, trainers)
        release_models(device)
    return items


# --- workflows, on a ComfyUI server -------------------------------------------------------------------------

def stand_in(folder: str, family: str, paths: dict[str, Path]) -> Path:
    """The built file that stands in for a model name the example workflows use (harness.server.STAND_INS)."""
    sdxl = family in ("sdxl", "sdxl_blocks")
    key = ("sd15" if family == "sd15" else "sdxl" if sdxl else None) if folder == "checkpoints" else \
        (folder if sdxl else None)
    if key not in paths:
        raise KeyError(f"gpu_check has no full-size stand-in for {folder}/{family}: add one to build_models()")
    return paths[key]


# harness.server.DIT_STAND_INS items (what the tiny e2e stand-in is) -> the ``paths`` name of the file built for
# them. Items missing here (Flux.1 schnell, a lone CLIP-G) have no full-size stand-in: no example workflow uses them.
DIT_STAND_IN_FILES = {"flux1": "flux1", "clip_l": "clip_l", "t5xxl": "t5xxl", "vae16": "vae16",
                      "sd3_checkpoint": "sd3", "flux_ipadapter_xlabs": "flux_ipadapter",
                      "clip_vision_l": "clip_vision_l",
                      # --families: Qwen-Image's and Z-Image Turbo's files (harness.server.QWEN_ZIMAGE_ITEMS)
                      "qwen_image": "qwen_image", "qwen25_7b": "qwen25_7b", "wan21_vae": "wan21_vae",
                      "z_image": "z_image", "qwen3_4b": "qwen3_4b"}


def prepare_server_base(base: Path, paths: dict[str, Path], tiny: bool) -> Path:
    from harness import server

    server.prepare_base(base, with_models=False)
    for folder, names in server.STAND_INS.items():
        for name, family in names.items():
            server._link(base / "models" / folder / name, stand_in(folder, family, paths))
    for folder, names in server.DIT_STAND_INS.items():
        for name, item in names.items():
            if item in DIT_STAND_IN_FILES:
                server._link(base / "models" / folder / name, paths[DIT_STAND_IN_FILES[item]])
    # the stock loader nodes read the tiny DiTs and the 1-layer T5 through the shims that answer only for files
    # carrying their metadata keys (harness.tiny_dits); the full-size Flux.1 and SD3.5 load as stock ComfyUI loads them
    server._link(base / "custom_nodes" / "frozentune_tiny_dit", REPO / "tests" / "harness" / "tiny_dit_node")
    server._link(base / "custom_nodes" / "frozentune_gpu_check_probe", PROBE_DIR)
    if tiny:  # the stock CLIPVisionLoader knows only full-size layouts (see harness.tiny_ipadapter)
        server._link(base / "custom_nodes" / "frozentune_tiny_clip_vision",
                     REPO / "tests" / "harness" / "tiny_clip_vision_node")
    return base


# Nodes whose step counts are training steps (pivotal_steps: UniTune's word steps before the tuning).
TRAINING_NODES = ("FrozenTuneUniTuneFineTune", "FrozenTuneControlNetZeroTrain", "FrozenTuneTextualInversionTrain")


def cap_training_steps(prompt: dict, steps: int) -> tuple[dict, dict]:
    """A copy of an API prompt whose training nodes run at most ``steps`` steps; returns it and what changed."""
    out = json.loads(json.dumps(prompt))
    changed = {}
    for node_id, node in out.items():
        inputs = node.get("inputs", {})
        if not node.get("class_type", "").startswith("FrozenTune") or not isinstance(inputs.get("steps"), int):
            continue
        if node["class_type"] not in TRAINING_NODES:
            continue
        for name in ("steps", "checkpoint_every", "pivotal_steps"):  # capped, not set: 0 (off) stays 0
            value = inputs.get(name)
            auto = name == "steps" and value == 0  # UniTune's steps 0 = its recipe's count (256 on DiTs)
            if isinstance(value, int) and (value > steps or auto):
                inputs[name] = steps
                changed[f"{node_id} {node['class_type']}.{name}"] = f"{value} -> {steps}"
    return out, changed


def run_workflow(srv, path: Path, mode: Mode, out: Path, timeout: float) -> dict:
    from harness.server import error_message, shrink_for_tiny_models

    prompt = srv.to_api(json.loads(path.read_text()))
    if mode.name == "tiny":
        prompt = shrink_for_tiny_models(prompt)
    prompt, changed = cap_training_steps(prompt, mode.workflow_train_steps)
    srv.post("/frozentune_gpu_check/reset", {})
    entry = srv.wait(srv.queue(prompt), timeout)
    stats = srv.get("/frozentune_gpu_check/stats")
    if entry["status"].get("status_str") != "success":
        raise RuntimeError(error_message(entry))
    files = srv.output_files(entry)
    if not files:
        raise RuntimeError("the workflow saved no image")
    dest = out / "workflows" / path.stem
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    copied = [str(Path(shutil.copy2(f, dest / f.name)).relative_to(out)) for f in files]
    rates = {}
    for node_id, times in stats["steps"].items():
        rate = steps_per_second(times)
        if rate is not None:
            rates[f"{node_id} {prompt.get(node_id, {}).get('class_type', '?')}"] = round(rate, 3)
    return {"max_memory_allocated": stats["max_memory_allocated"], "node_it_per_s": rates,
            "steps": sum(len(t) for t in stats["steps"].values()), "settings": changed, "outputs": copied}


# The base named in a workflow's title (its last parentheses) -> the family this check builds full-size models for.
# The SD run takes the SD1.5 and SDXL ones, ``--dit`` the Flux.1 dev and SD3.5 ones.
WORKFLOW_BASES = {"SD1.5": "sd15", "SDXL": "sdxl", "Flux.1 dev": "flux1", "SD3.5": "sd3",
                  "Qwen-Image": "qwen_image", "Z-Image Turbo": "z_image"}
# Workflows on bases this check builds no full-size model for yet, and why (logged when a run picks its workflows);
# none since issue 24 (``--families`` runs the Qwen-Image and Z-Image Turbo ones; Chroma has no example workflow).
UNBUILT_BASES: dict[str, str] = {}


def workflow_base(path: Path) -> str:
    return path.stem.rsplit("(", 1)[-1].rstrip(")") if path.stem.endswith(")") else ""


def workflow_files(names: list[str] | None = None, dit: bool = False, families: bool = False) -> list[Path]:
    """The example workflows of the run (the SD bases, with ``dit`` the Flux.1/SD3.5 ones, with ``families`` the
    Qwen-Image/Z-Image Turbo ones), or those of ``names`` (file stems, any base this check builds; an unknown one is
    an error naming the choices)."""
    files = [p for p in sorted((REPO / "workflows").glob("*.json")) if workflow_base(p) in WORKFLOW_BASES]
    if not names:
        for p in sorted((REPO / "workflows").glob("*.json")):
            if workflow_base(p) in UNBUILT_BASES:
                log.info("gpu-check: not running %s: %s", p.stem, UNBUILT_BASES[workflow_base(p)])
        bases = MORE_DITS if families else DIT_FAMILIES if dit else FAMILIES
        return [p for p in files if WORKFLOW_BASES[workflow_base(p)] in bases]
    stems = {p.stem: p for p in files}
    unknown = [n for n in names if n not in stems]
    if unknown:
        raise SystemExit(f"gpu-check: no workflow {', '.join(unknown)}; choose from {', '.join(stems)}")
    return [stems[n] for n in names]


def headless_server_args(build: Path) -> list[str]:
    """ComfyUI flags for a server nobody browses: no API nodes (none is used; a lent GPU machine has no
    internet), and where the frontend package is not installed (the offline bundle, ``make gpu-bundle``)
    an empty web root instead of ComfyUI's exit for the missing page."""
    args = ["--disable-api-nodes"]
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        web = build / "empty_web_root"
        web.mkdir(parents=True, exist_ok=True)
        args += ["--front-end-root", str(web)]
    return args


def run_workflows(mode: Mode, paths: dict[str, Path], device: str, build: Path, out: Path,
                  timeout: float, workflows: list[Path]) -> list[Item]:
    from harness.server import ComfyServer

    items = [Item(f"workflow {p.stem}", "workflow") for p in workflows]
    try:
        base = prepare_server_base(build / f"server_{mode.name}", paths, tiny=mode.name == "tiny")
        srv = ComfyServer(base, cpu=device == "cpu", startup_timeout=300,
                          extra_args=headless_server_args(build)).start()
    except Exception as err:  # noqa: BLE001 - reported on every workflow item
        for item in items:
            item.error = f"not run: the ComfyUI server did not start: {one_line(err)}"
        return items
    try:
        for item, path in zip(items, workflows, strict=True):  # peak memory: measured in the server
            run_item(item, functools.partial(run_workflow, srv, path, mode, out, timeout), "cpu")
    finally:
        srv.stop()
        log.info("gpu-check server log: %s", srv.log_path)
    return items


# --- report ---------------------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    import torch

    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "machine": platform.machine()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
    return env


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# gpu-check ({report['mode']} models, {report['environment'].get('gpu', report['environment']['device'])})",
             "",
             f"{report['passed']}/{len(report['items'])} items passed in {report['seconds']:.0f}s "
             f"(building the models: {report['build_seconds']:.0f}s). torch {report['environment']['torch']}, "
             f"CUDA {report['environment']['cuda']}. UNet parameters: "
             + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in report["unet_parameters"].items()) + ".",
             "",
             f"Time, the build included: {report['seconds']:.0f}s (target: under "
             f"{QUICK_BUDGET_SECONDS if report.get('quick') else BUDGET_SECONDS}s on one H100"
             f"{', --quick' if report.get('quick') else ', --dit' if report.get('dit') else ''}"
             f"{', --families' if report.get('families') else ''}).",
             "", *disk_lines(report), "",
             "| item | result | seconds | it/s | peak memory | settings / error |",
             "|---|---|---:|---:|---:|---|"]
    for it in report["items"]:
        rate = _fmt(it["it_per_s"]) if it["it_per_s"] is not None else (
            ", ".join(f"{k}: {v:.2f}" for k, v in it["node_it_per_s"].items()) or "-")
        detail = it["error"] or ", ".join(f"{k}={v}" for k, v in it["settings"].items())
        peak = _gib(it["max_memory_allocated"])
        if it.get("memory_target_gib"):
            peak += f" (target ≤ {it['memory_target_gib']:g})"
        lines.append(f"| {it['name']} | {'pass' if it['passed'] else '**FAIL**'} | {it['seconds']:.1f} | {rate} | "
                     f"{peak} | {detail.replace('|', '/')} |")
    lines += ["", "it/s: steps after the first, from the progress-bar updates (workflows: per node). Peak memory: "
              "torch.cuda.max_memory_allocated, reset before each item. Workflows run at their own sizes; "
              "only training steps are capped (see settings).", ""]
    if any(it["name"].split(" ")[1] in ALL_DITS for it in report["items"] if it["kind"] != "workflow") or \
            report.get("dit") or report.get("families"):
        lines += dit_lines(report)
    (out / "report.md").write_text("\n".join(lines))


GB = 10**9


def disk_lines(report: dict) -> list[str]:
    """The disk the built files take (limit: 40 GB in the build folder, which both runs share)."""
    disk = report["disk"]
    lines = [f"Disk: the files built in {disk['folder']} take {disk['built_bytes'] / GB:.1f} GB (limit "
             f"{DISK_LIMIT_BYTES / GB:.0f} GB)."]
    if disk.get("removed"):
        lines[0] += f" Removed first, the other run's cached files: {', '.join(disk['removed'])}."
    # the dry run: what the GPU runs would write, from the full-size layouts on the meta device; a GPU run: the same
    # figures (FULL_SIZE_BYTES, which the dry-run test checks against those layouts)
    layouts = report.get("full_size_layouts") or {"disk_bytes": FULL_SIZE_BYTES}
    sizes = layouts["disk_bytes"]
    run_files = {run: list(dict.fromkeys(n for g in groups for n in MODEL_GROUPS[g]))
                 for run, groups in RUN_GROUPS.items()}
    sd, dit, more = (sum(sizes.get(n, 0) for n in run_files[run]) for run in RUN_GROUPS)
    files = {run: ", ".join(f"{k} {sizes.get(k, 0) / GB:.2f}" for k in run_files[run]) for run in ("DiT", "--families")}
    both = (f"together {(sd + dit) / GB:.1f} GB, over the limit: a run first removes the other run's cached files, "
            f"so the folder holds at most {max(sd, dit, more) / GB:.1f} GB" if sd + dit > DISK_LIMIT_BYTES
            else f"together {(sd + dit) / GB:.1f} GB")
    lines.append(f"At full size: the SD run writes {sd / GB:.1f} GB, the DiT run {dit / GB:.1f} GB ({files['DiT']}), "
                 f"the --families run {more / GB:.1f} GB ({files['--families']}; t5xxl and vae16 shared with the DiT "
                 f"run); the SD and DiT runs {both} (limit {DISK_LIMIT_BYTES / GB:.0f} GB).")
    return lines


# bench/memory_bench.py --full's figures for the same cases (FakeTensorMode, bench/README.md), beside the measured
DIT_MEMORY_BENCH_GIB = {("unitune_finetune", "flux1"): 13.963, ("unitune_finetune", "sd3"): 9.513,
                        ("controlnet_zero", "flux1"): 18.669, ("unitune_finetune", "qwen_image"): 22.588,
                        ("unitune_finetune", "z_image"): 8.718}


def dit_lines(report: dict) -> list[str]:
    """The DiT part of report.md: UniTune LoRA's and ControlNet-Zero Flux.1's s/step and peak memory against the
    memory bench's targets (``--families``: every trainer item, Textual Inversion's peak without one), and the time
    estimates the run was planned with."""
    lines = ["UniTune LoRA (Qwen-Image, Z-Image, Chroma: the node's default rank 32) and Textual Inversion (no "
             "targets) on the DiTs (1024 px at full size, batch 1, fp8 weights, bf16, checkpointing; memory bench "
             "targets and its FakeTensorMode figure):", ""] \
        if report.get("families") else \
        ["UniTune LoRA and ControlNet-Zero (Flux.1: 2 double blocks, 8-bit AdamW) on the DiTs (1024 px at full "
         "size, batch 1, fp8 weights, bf16, checkpointing; memory bench targets and its FakeTensorMode figure):", ""]
    for it in report["items"]:
        trainer, family = it["name"].split(" ")[:2]
        if it["kind"] != "trainer" or not (it.get("memory_target_gib") or family in MORE_DITS):
            continue
        step = f"{1 / it['it_per_s']:.2f} s/step" if it["it_per_s"] else "s/step -"
        peak = it["max_memory_allocated"]
        # --families: the bench's targets leave the text encoder out; ComfyUI keeps it loaded when memory allows
        resident = int(it["settings"].get("text_encoder_resident_gib", 0) * 2**30)
        training = None if peak is None else peak - resident
        note = f" (text encoder still loaded: {_gib(resident)}; without it {_gib(training)})" if resident else ""
        if not it.get("memory_target_gib"):  # Chroma: no target, the peak is reported
            lines.append(f"- {it['name']}: {step}, peak {_gib(peak)}{note} (no target)")
            continue
        verdict = "-" if training is None else ("met" if training <= it["memory_target_gib"] * 2**30 else "**over**")
        lines.append(f"- {it['name']}: {step}, peak {_gib(peak)}{note} against ≤ {it['memory_target_gib']:g} GiB "
                     f"({verdict}; memory bench {DIT_MEMORY_BENCH_GIB[(trainer, family)]} GiB)")
    run, estimates = ("--families", FAMILY_ESTIMATES) if report.get("families") else ("--dit", DIT_ESTIMATES)
    total = sum(s for _, s in estimates)
    lines += ["", f"Planned (estimates for {run} on one H100 from FLOP counts and the write pace, before any GPU ran "
              f"it; {total} s of {BUDGET_SECONDS} s):", ""]
    lines += [f"- {what}: ~{seconds} s" for what, seconds in estimates]
    return lines + [""]


# --- main -------------------------------------------------------------------------------------------------------

def no_gpu_reason() -> str | None:
    """Why this machine cannot run the GPU check, in one line (None when a CUDA GPU is visible)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return None
    return (f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run it on a machine "
            "with an NVIDIA GPU and driver")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu only with --tiny: the dry run the unit test uses")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 64 px, 2 steps (the CPU dry run)")
    parser.add_argument("--only", choices=("all", "trainers", "workflows"), default="all")
    parser.add_argument("--train-steps", type=int, default=4, help="steps per trainer item (full size)")
    parser.add_argument("--workflow-train-steps", type=int, default=8,
                        help="cap on the training steps of the example workflows (full size)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "gpu_check", help="report folder")
    parser.add_argument("--build", type=Path, default=REPO / "build" / "gpu_check",
                        help="where the random models are cached")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per workflow")
    parser.add_argument("--workflows", default="",
                        help="comma-separated workflow file stems (default: all on the run's bases)")
    parser.add_argument("--loads", default="", help="comma-separated family:dtype loads the trainers run on, of "
                        f"{', '.join(ALL_LOADS)} (default: {', '.join(SD_LOADS)}; with --dit {', '.join(DIT_LOADS)}; "
                        f"with --families {', '.join(FAMILY_LOADS)})")
    parser.add_argument("--dit", action="store_true",
                        help="Flux.1-dev and SD3.5 Large instead of SD1.5/SDXL (loads " + ", ".join(DIT_LOADS)
                        + f" and their workflows): a run of its own, in {BUDGET_SECONDS // 60} minutes on one H100")
    parser.add_argument("--families", action="store_true",
                        help="Qwen-Image, Z-Image and Chroma instead (loads " + ", ".join(FAMILY_LOADS)
                        + ", UniTune LoRA and Textual Inversion on each, and the Qwen-Image / Z-Image Turbo "
                        f"workflows): a run of its own, in {BUDGET_SECONDS // 60} minutes on one H100")
    parser.add_argument("--quick", action="store_true",
                        help="one trainer item per family (" + ", ".join(f"{t[0]} {k}" for k, t in QUICK_TRAINERS.items())
                        + f") and one workflow ({QUICK_WORKFLOW}), in {QUICK_BUDGET_SECONDS // 60} minutes on one H100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs only with --tiny (full-size models need a GPU)")
    if args.device == "cuda" and (reason := no_gpu_reason()):
        print(f"gpu-check: {reason}", file=sys.stderr)
        return 2

    if args.quick and (args.loads or args.workflows or args.dit or args.families):
        parser.error("--quick chooses the loads and the workflow itself: drop --loads / --workflows / --dit / "
                     "--families")
    if args.dit and args.families:
        parser.error("--dit and --families are runs of their own (10 minutes each): pick one")
    # a typo fails here, before any work
    loads = parse_loads(",".join(QUICK_TRAINERS) if args.quick else args.loads, dit=args.dit, families=args.families)
    names = [QUICK_WORKFLOW] if args.quick else [n.strip() for n in args.workflows.split(",") if n.strip()]
    workflows = workflow_files(names, dit=args.dit, families=args.families)
    needs = model_needs(loads if args.only in ("all", "trainers") else [],
                        workflows if args.only in ("all", "workflows") else [])
    from harness import comfy_env

    comfy_env.import_comfy(cpu=args.device == "cpu")
    comfy_env.import_pack()
    import folder_paths

    mode = tiny_mode() if args.tiny else full_mode(args.train_steps, args.workflow_train_steps)
    build = args.build / mode.name
    for setter, sub in ((folder_paths.set_output_directory, "output"), (folder_paths.set_temp_directory, "temp"),
                        (folder_paths.set_input_directory, "input")):
        (build / "run" / sub).mkdir(parents=True, exist_ok=True)
        setter(str(build / "run" / sub))
    # Textual Inversion Train writes its file into the first embeddings folder: this run's, not ComfyUI's tree
    (build / "run" / "embeddings").mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("embeddings", str(build / "run" / "embeddings"), is_default=True)

    start = time.perf_counter()
    removed: list[Path] = []
    paths = build_models(mode, build, args.device, needs, removed)
    build_seconds = time.perf_counter() - start
    items = []
    if args.only in ("all", "trainers"):
        items += run_trainers(mode, paths, args.device, loads, QUICK_TRAINERS if args.quick else None)
    if args.only in ("all", "workflows"):
        items += run_workflows(mode, paths, args.device, build, args.out, args.timeout, workflows)
    report = {
        "mode": mode.name, "quick": args.quick, "dit": args.dit, "families": args.families,
        "environment": environment(args.device),
        "unet_parameters": {f: unet_parameters(paths[f], UNET_PREFIX[f]) for f in (*FAMILIES, *ALL_DITS)
                            if paths[f].exists()},
        "disk": {"folder": str(build), "built_bytes": sum(p.stat().st_size for p in build.glob("*.safetensors")),
                 "removed": [p.name for p in removed]},
        "full_size_layouts": full_size_layouts() if mode.name == "tiny" else None,
        "build_seconds": round(build_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
        "passed": sum(i.passed for i in items), "items": [asdict(i) for i in items],
    }
    write_report(args.out, report)
    failed = [i.name for i in items if not i.passed]
    log.info("gpu-check: %d/%d passed in %.0fs; report: %s", report["passed"], len(items), report["seconds"],
             args.out / "report.md")
    if failed:
        log.error("gpu-check failed: %s", ", ".join(failed))
    return exit_code(items)


if __name__ == "__main__":
    sys.exit(main())
