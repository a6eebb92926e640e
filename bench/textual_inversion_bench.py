"""Textual inversion training speed and peak memory against diffusers' ``textual_inversion.py`` loop.

Arms, each in its own process (one torch thread; peak RSS reset with /proc/self/clear_refs right
before the loop and read from VmHWM), timing rounds alternating:

- ``ours``: ``textual_inversion.word_trainer.train`` on the tiny SD1.5 checkpoint loaded by ComfyUI (16.2M
  UNet, full-size 12-layer CLIP-L, TAESD VAE). The images are VAE-encoded once before training (the
  latent cache); the vectors are two ``[vectors, 768]`` fp32 leaves fed in where the stock tokenizer puts
  an embedding, so the 49408 x 768 token table gets no gradient, no optimizer state and no copy. One
  caption per step: the text encoder runs once and its output is shared by the ``batch`` noise draws.
- ``diffusers``: the training loop of diffusers' examples/textual_inversion/textual_inversion.py
  re-implemented step for step with the same weights: ``CLIPTextModel`` (the checkpoint's CLIP-L),
  ``UNet2DConditionModel`` of the closest shape (random weights: the tiny UNet's attention-free first up
  layer has no diffusers equivalent),
  ``AutoencoderTiny`` (the checkpoint's TAESD). As the script does: the placeholder tokens are added to
  the tokenizer and the embedding table is resized; the whole table trains under AdamW (lr, betas
  (0.9, 0.999), weight decay 1e-2) and its other rows are restored from a full copy after every step;
  every step VAE-encodes the batch and encodes one caption per image; epsilon MSE loss.

Same batch, resolution, vectors, learning rate, fp32, no gradient checkpointing, CPU.

What ours caches: the latents (the VAE runs once, before training) and, per step, the text encoder's
output (one caption, shared by the ``batch`` draws). Not cached: the caption's prefix. CLIP's causal
mask makes the hidden states before the new word independent of the vectors, but ``prefix`` (an arm
of this script, in its own process) measures what caching them could save at most: CLIP-L's 12 layers
forward and backward on 77 tokens against 77 minus the templates' mean prefix (5.85 tokens: start +
"a photo of a"), as a share of one training step. Everything from the word on (with the padding,
and SDXL's pooled output at the end token) depends on the vectors and must run every step.
Run from tests/: ``cd tests && ../.venv/bin/python ../bench/textual_inversion_bench.py``.
Random tiny weights: these figures are about the machinery, not image quality.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from controlnet_zero_bench import _reset_peak, _status  # peak RSS via /proc (bench/ is this script's path)

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
CAPTIONS = "object templates"


def _rate(times: list[float], warmup: int) -> float:
    """Seconds per step: the median interval between the timed steps' ends (robust to load spikes)."""
    return statistics.median(b - a for a, b in zip(times[warmup - 1:], times[warmup:], strict=False))


def _pixels(args):
    """``args.images`` views of the harness subject (flips and shifts), ``[N, res, res, 3]`` in 0..1."""
    import torch

    from harness.images import subject_image

    base = subject_image(args.res)
    views = [base, base.flip(2), base.roll(args.res // 8, 2), base.flip(1)]
    return torch.cat([views[i % len(views)] for i in range(args.images)])


def child_ours(args) -> dict:
    from harness import comfy_env, tiny_models

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import comfy.sd

    from frozentune.textual_inversion import word_trainer as ti

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_models.checkpoint_path("sd15")),
                                                                 embedding_directory=[])
    latents = vae.encode(_pixels(args))  # the latent cache: once, before training
    settings = ti.TextualInversionSettings(init_text="object", vectors=args.vectors, captions=CAPTIONS,
                                           steps=args.warmup + args.steps, batch_size=args.batch,
                                           learning_rate=args.lr, seed=0, precision="fp32")
    times: list[float] = []
    rss = _reset_peak()
    ti.train(model, clip, latents, settings, name="benchword", on_step=lambda s, n, loss: times.append(time.perf_counter()))
    text = clip.cond_stage_model.clip_l.transformer
    return {"s_per_step": _rate(times, args.warmup), "rss_before": rss, "peak": _status("VmHWM"),
            "trained_values": args.vectors * 768,
            "unet_params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
            "text_params": sum(p.numel() for p in text.parameters())}


def _text_model(text_encoder):
    """``CLIPTextModel.text_model`` (transformers 4), or the model itself (transformers 5 has no wrapper)."""
    return getattr(text_encoder, "text_model", text_encoder)


def _diffusers_models():
    """CLIP-L, UNet and TAESD from the tiny SD1.5 checkpoint, as diffusers/transformers modules."""
    import safetensors.torch
    import torch
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness import tiny_models

    sd = safetensors.torch.load_file(str(tiny_models.checkpoint_path("sd15")))
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77,
                                                hidden_act="quick_gelu", projection_dim=768))
    prefix = "cond_stage_model.transformer.text_model."
    text_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    missing, unexpected = _text_model(text_encoder).load_state_dict(text_sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing[:3], unexpected[:3])
    # The tiny UNet has no attention in its first up layer, which UNet2DConditionModel cannot express: the
    # closest diffusers shape (as controlnet_zero_bench.py), random weights (speed and memory do not depend on them).
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type="UNetMidBlock2D", cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderTiny()  # the encoder is what training runs; the decoder's layer numbering differs
    prefix = "first_stage_model.taesd_encoder."
    vae.encoder.load_state_dict({"layers." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                                strict=True)
    del sd
    return text_encoder, unet, vae


def _object_templates() -> tuple[str, ...]:
    """Our trainer's caption templates, read from its source (this process never imports ComfyUI)."""
    import ast

    tree = ast.parse((REPO / "unitune" / "textual_inversion.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "OBJECT_TEMPLATES":
            return ast.literal_eval(node.value)
    raise LookupError("OBJECT_TEMPLATES not found in unitune/textual_inversion.py")


def child_diffusers(args) -> dict:
    """diffusers' textual_inversion.py training loop (SD1.5), step for step."""
    import random

    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    text_encoder, unet, vae = _diffusers_models()
    tokenizer = CLIPTokenizer.from_pretrained(str(REPO / "build" / "comfyui" / "comfy" / "sd1_tokenizer"))
    placeholders = ["<benchword>"] + [f"<benchword>_{i}" for i in range(1, args.vectors)]
    assert tokenizer.add_tokens(placeholders) == args.vectors
    init_id = tokenizer.encode("object", add_special_tokens=False)[0]
    ids = tokenizer.convert_tokens_to_ids(placeholders)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set just below
    table = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for i in ids:
            table[i] = table[init_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    _text_model(text_encoder).encoder.requires_grad_(False)
    _text_model(text_encoder).final_layer_norm.requires_grad_(False)
    _text_model(text_encoder).embeddings.position_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=args.lr, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    pixels = _pixels(args).movedim(-1, 1) * 2 - 1
    placeholder = " ".join(placeholders)
    templates = _object_templates()
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    unet.train()
    text_encoder.train()
    times: list[float] = []
    rss = _reset_peak()
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    for _ in range(args.warmup + args.steps):
        rows = torch.randint(0, pixels.shape[0], (args.batch,), generator=gen)
        captions = [rng.choice(templates).format(placeholder) for _ in range(args.batch)]
        input_ids = tokenizer(captions, padding="max_length", truncation=True, max_length=77,
                              return_tensors="pt").input_ids
        latents = vae.encode(pixels[rows]).latents.detach() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(input_ids)[0]
        pred = unet(noisy, timesteps, states).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        keep = torch.ones((len(tokenizer),), dtype=torch.bool)
        keep[min(ids): max(ids) + 1] = False
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[keep] = orig_embeds_params[keep]
        times.append(time.perf_counter())
    return {"s_per_step": _rate(times, args.warmup), "rss_before": rss, "peak": _status("VmHWM"),
            "trained_values": text_encoder.get_input_embeddings().weight.numel(),
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_params": sum(p.numel() for p in text_encoder.parameters())}


def child_prefix(args) -> dict:
    """The most caching the caption prefix could save per step (bench settings, one process)."""
    from harness import comfy_env, tiny_models

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import comfy.sd
    import torch

    from frozentune.textual_inversion import word_trainer as ti

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_models.checkpoint_path("sd15")),
                                                                 embedding_directory=[])
    latents = vae.encode(_pixels(args))
    settings = ti.TextualInversionSettings(init_text="object", vectors=args.vectors, captions=CAPTIONS, steps=1,
                                           batch_size=args.batch, learning_rate=args.lr, seed=0, precision="fp32")
    sub = clip.tokenizer.clip_l
    prefix = statistics.mean(len(sub.tokenizer(t.split("{}")[0].strip())["input_ids"]) - 1
                             for t in ti.OBJECT_TEMPLATES)  # start token + the words before the placeholder

    def seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    ti._load(model, clip)
    with torch.inference_mode(False), torch.enable_grad():
        run = ti.TrainingRun(model, clip, latents, settings, "benchword")
        encoder = run.text.clip_l.transformer.text_model.encoder

        def layers(tokens: int) -> None:
            x = torch.randn(1, tokens, 768, requires_grad=True)
            encoder(x, mask=torch.full((tokens, tokens), float("-inf")).triu_(1))[0].sum().backward()

        # Interleaved, and the fastest of each kept: a shared machine's load only ever adds time.
        times: dict[str, list[float]] = {"step": [], "full": [], "cached": []}
        for _ in range(args.warmup + args.steps):
            times["step"].append(seconds(lambda: run.step(0)))
            times["full"].append(seconds(lambda: layers(77)))
            times["cached"].append(seconds(lambda: layers(77 - round(prefix))))
        step, full, cached = (min(times[k][args.warmup:]) for k in ("step", "full", "cached"))
    return {"prefix": prefix, "step": step, "full": full, "cached": cached}


def run_child(arm: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--res", str(args.res), "--images", str(args.images), "--vectors",
           str(args.vectors), "--lr", str(args.lr), "--threads", str(args.threads)]
    out = subprocess.run(cmd, cwd=TESTS, env=dict(os.environ, PYTHONPATH=str(TESTS)), capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--vectors", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: stable under load)")
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    p.add_argument("--no-prefix", dest="prefix", action="store_false", help="skip the caption-prefix measurement")
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        sys.path.insert(0, str(TESTS))
        arms = {"ours": child_ours, "diffusers": child_diffusers, "prefix": child_prefix}
        print(json.dumps(arms[args.child](args)))
        return
    mib = 1024 ** 2
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    for _ in range(args.rounds):
        for arm in runs:
            runs[arm].append(run_child(arm, args))
    print(f"Textual inversion vs diffusers' textual_inversion.py loop: SD1.5 tiny checkpoint (UNet "
          f"{runs['ours'][0]['unet_params'] / 1e6:.1f}M, CLIP-L {runs['ours'][0]['text_params'] / 1e6:.1f}M, TAESD), "
          f"batch {args.batch}, {args.res}px, {args.images} images, {args.vectors} vectors, lr {args.lr}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, fp32, CPU ({os.cpu_count()} cores, {args.threads} "
          f"torch thread(s) per process, load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
    print(f"{'arm':<11}{'s/step per round':>22}{'median':>8}{'RSS before MiB':>16}{'peak MiB':>10}"
          f"{'peak-before MiB':>17}{'trained values':>16}")
    sec, growth, peak = {}, {}, {}
    for arm, rounds in runs.items():
        sec[arm] = statistics.median(r["s_per_step"] for r in rounds)
        growth[arm] = statistics.median(r["peak"] - r["rss_before"] for r in rounds)
        peak[arm] = statistics.median(r["peak"] for r in rounds)
        per_round = " ".join(f"{r['s_per_step']:.3f}" for r in rounds)
        print(f"{arm:<11}{per_round:>22}{sec[arm]:>8.3f}{rounds[0]['rss_before'] / mib:>16.0f}{peak[arm] / mib:>10.0f}"
              f"{growth[arm] / mib:>17.1f}{rounds[0]['trained_values']:>16,}")
    print(f"ratios ours/diffusers: seconds per step {sec['ours'] / sec['diffusers']:.2f}x, peak RSS "
          f"{peak['ours'] / peak['diffusers']:.2f}x, training RSS growth "
          f"{growth['ours'] / max(growth['diffusers'], 1):.2f}x (targets: below 1)")
    if args.prefix:
        pre = run_child("prefix", args)
        saved = pre["full"] - pre["cached"]
        print(f"caption prefix cache, at most: CLIP-L 12 layers forward+backward {pre['full']:.3f} s on 77 tokens, "
              f"{pre['cached']:.3f} s on {77 - round(pre['prefix'])} (mean prefix {pre['prefix']:.2f} tokens): "
              f"{saved:.3f} s of a {pre['step']:.3f} s step ({100 * saved / pre['step']:.1f}%)")


if __name__ == "__main__":
    main()
