"""What each ControlNet-Zero setting means: one text per setting, read by the node tooltips and the CLI's --help.

A setting the node and ``python -m controlnet_zero.train`` share (``steps``, ``resume``, ...) has one
entry here, so the UI and the command line can never explain it differently; the CLI-only flags
(``checkpoint``, ``work_dir``, ...) and the node-only inputs have theirs too. No ``%`` anywhere
(argparse would read it as a format).

``TEXTS`` are tooltips: at most two sentences and 320 characters (the node's help page,
nodes/web/docs/FrozenTuneControlNetZeroTrain.md, holds the figures). The command line has no help
page, so ``cli_text`` appends the detail in ``CLI_MORE`` to a flag's help; it never replaces the text.
"""

from __future__ import annotations

# the node input a CLI flag shares its text with, where the names differ
CLI_TO_NODE = {"save_dtype": "dtype"}

TEXTS: dict[str, str] = {
    # --- shared by the Train node and the CLI
    "steps": "Optimizer steps. Control usually appears suddenly after a few thousand steps at batch 4.",
    "batch_size": "Samples per micro-batch (per process under torchrun).",
    "gradient_accumulation": "Micro-batches per optimizer step (effective batch = batch_size x this).",
    "learning_rate": "AdamW step size (the ControlNet paper: 1e-5). Must be a finite positive number.",
    "prompt_dropout": "Share of samples trained with an empty caption, so the ControlNet learns the hint's "
                      "meaning (the paper: 0.5).",
    "resolution": "Training size: images and hints are scaled (short side) and center-cropped to this square.",
    "gradient_checkpointing": (
        "Recompute the activations of both networks (the ControlNet and the frozen UNet) in the backward pass "
        "instead of keeping them: much less memory for about one extra forward pass per step, with the same loss "
        "and gradients."),
    "mixed_precision": (
        "The compute dtype; only the ControlNet trains, as fp32 weights, and the base keeps its load dtype. auto: "
        "bf16 autocast on CUDA GPUs that support it, else fp16 with loss scaling, fp32 on the CPU; bf16/fp16 ask "
        "for it (bf16 also runs on the CPU)."),
    "optimizer": (
        "adamw: torch AdamW (the ControlNet paper's), 8 bytes of state per trained weight; adamw8bit: "
        "bitsandbytes' 8-bit AdamW, about 2 bytes (needs the bitsandbytes package). Resume with the optimizer "
        "the checkpoint was written with."),
    "seed": "Seed for sample order, noise, timesteps and prompt dropout.",
    "checkpoint_every": (
        "Save a resumable checkpoint every N steps (0 = off) into this run's own folder: "
        "output/controlnet_zero/<run_name>/run_NNN/ in the node, <work_dir>/checkpoints/run_NNN/ on the command "
        "line. Only this run's newest checkpoints are kept (keep_checkpoints, 2); other runs' are never touched."),
    "resume": (
        "On: continue the newest checkpoint of an earlier run with the same settings and dataset (one with other "
        "settings is refused, naming them; with none, a new run starts). Off: a new run in a new run_NNN "
        "sub-folder, so earlier runs' checkpoints are kept."),
    "save_dtype": "Weight precision in the file: fp32 keeps the trained weights exactly, fp16/bf16 halve the size.",
    # --- Train node only
    "model": "The frozen base model. It is not modified.",
    "clip": "The model's text encoder, used once per unique caption.",
    "vae": "The model's VAE, used once per training image.",
    "control_net": "The ControlNet to train: from ControlNet-Zero Create, or a file of the same base model loaded "
                   "with Load ControlNet Model to continue.",
    "dataset_folder": (
        "A folder with images/, conditioning/ (RGB hints, same file names) and a .txt caption per image, or a "
        ".jsonl manifest, inside ComfyUI's input folder or a folder listed in FROZENTUNE_DATA_DIRS. Leave empty "
        "to train on the image/hint inputs."),
    "run_name": "Folder name for this run's checkpoints, under output/controlnet_zero/: one plain name (no "
                "folders). Each new run gets its own run_NNN sub-folder.",
    "images": "Target images (instead of a folder).",
    "hints": "RGB hints, one per target image, same size.",
    "captions": "Captions for the image inputs: one line for all, or one line per image.",
    "preview_every": (
        "Show a preview in this node every N optimizer steps (0 = off): the first training hint and its caption "
        "drawn from a fixed noise with the ControlNet as trained so far. The trained ControlNet is bit-identical "
        "with previews on or off."),
    "previews": "The previews drawn while training, side by side in step order (a 64x64 black image when "
                "preview_every is 0).",
    "flux_guidance": (
        "The guidance strength Flux.1 dev (it takes one as input) trains at, fed to the ControlNet and the base: 4, "
        "as XLabs' x-flux ControlNet trainer (diffusers' for the flux_instantx layout: 3.5). Other families have no "
        "such input and ignore it."),
    # --- Create node only
    "depth": (
        "Transformer blocks the ControlNet copies from the MODEL; 0 = the reference default: Flux.1 2 double blocks "
        "(XLabs) or 4 (InstantX), SD3/SD3.5 12 (diffusers, at most blocks - 1), Qwen-Image 5 (diffusers). SD1.5/SDXL copy the whole "
        "encoder: keep 0 there."),
    "layout": (
        "The ControlNet's file layout: family default (Flux.1: XLabs', pixel hints) or flux_instantx (Flux.1: "
        "InstantX's / diffusers', VAE-latent hints; connect the VAE in Apply ControlNet); other families have one."),
    # --- Save node only
    "filename": "Name under models/controlnet/ (sub-folders allowed, e.g. controlnet_zero/edges; 'controlnet/...' "
                "is the same folder); a counter is added if it exists. Absolute paths, '..', hidden names, other "
                "model folders and names ending in _shuffle are refused.",
    # --- command line only
    "config": "TOML file with the settings below (flags override it).",
    "checkpoint": "The frozen base model file (a ComfyUI checkpoint). Command-line paths are used as given: "
                  "the CLI is run by the machine's owner and is not confined to ComfyUI's folders.",
    "dataset": "The dataset folder: images/ + conditioning/ + a .txt caption per image, or a .jsonl manifest "
               "(paths relative to the folder). Not confined to ComfyUI's input folder (the node's dataset_folder is).",
    "output": "The ControlNet file to write, e.g. models/controlnet/my_controlnet.safetensors.",
    "controlnet": "Optional: a ControlNet file of the same base model to continue training from, in the layout "
                  "ControlNet-Zero Save writes for its family (SD1.5/SDXL ldm, Flux.1 XLabs, SD3 diffusers, Qwen-Image "
                  "InstantX).",
    "diffusion_model": "Instead of checkpoint: the frozen base's diffusion model alone (a UNETLoader file, e.g. "
                       "flux1-dev.safetensors); give text_encoders and vae with it.",
    "weight_dtype": "How the base's weights are stored while training, as UNETLoader's weight_dtype: default keeps "
                    "the file's dtype, fp8_e4m3fn / fp8_e4m3fn_fast / fp8_e5m2 store them in fp8 (computed per "
                    "operation in the compute dtype).",
    "text_encoders": "With diffusion_model: the text-encoder files, as CLIPLoader/DualCLIPLoader take them (Flux.1: "
                     "clip_l + t5xxl; SD3/SD3.5: clip_l + clip_g + t5xxl; Qwen-Image: qwen_2.5_vl_7b); the type "
                     "follows the model's family.",
    "work_dir": "Folder for checkpoints (checkpoints/run_NNN/) and losses.json; the encoding cache lives there "
                "while training and is removed after. Default: <output>_run/.",
    "eval_rows": "Training pairs to measure a fixed-draw loss on before and after training (0 = off).",
    "log_every": "Log the loss every N steps.",
    "weight_decay": "AdamW weight decay.",
    "max_grad_norm": "Clip the gradient norm to this before each step (0 = off).",
    "keep_checkpoints": "How many of this run's newest checkpoints to keep (0 = all).",
}


# What a flag's --help adds to its short text (the node's help page says the same for the UI).
CLI_MORE: dict[str, str] = {
    "vae": "On the command line: a VAE file (as VAELoader reads it, e.g. ae.safetensors for Flux.1), with "
           "diffusion_model and text_encoders instead of checkpoint.",
    "gradient_checkpointing": "Measured on the tiny SD1.5 test model (batch 2, 64 px): the bytes kept for backward "
                              "drop to 0.31x with an fp32 base and 0.12x with an fp16 base.",
    "mixed_precision": "The base (fp16, bf16 or fp8 storage) is cast per operation; the control residuals and their "
                       "gradients are in the compute dtype, never the base's fp16.",
    "optimizer": "adamw8bit is blockwise (as diffusers' train_controlnet.py --use_8bit_adam), both moments as 8-bit "
                 "codes (tensors under 4096 values keep fp32 state); measured on the tiny SD1.5's ControlNet "
                 "(10.5M weights): 20.5 MiB of state against AdamW's 80.2 MiB. Checkpoints store either state.",
    "resume": "Here the earlier run is work_dir's, or give a checkpoint folder instead of true; its weights, "
              "optimizer, step and random state continue. A run is the same when the base model, the dataset's files and captions, "
              "resolution, optimizer, learning_rate, weight_decay, max_grad_norm, prompt_dropout, batch_size, "
              "gradient_accumulation and seed match; with no checkpoint to continue, the log says so.",
}


def text(name: str) -> str:
    """The explanation of setting ``name`` (KeyError for an unknown one: every setting needs a text)."""
    return TEXTS[name]


def cli_text(name: str) -> str:
    """A flag's --help: the setting's text, plus the detail a tooltip leaves to the help page."""
    return f"{TEXTS[name]} {CLI_MORE[name]}" if name in CLI_MORE else TEXTS[name]
