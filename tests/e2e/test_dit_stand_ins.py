"""The e2e/demo server runs Flux.1 and SD3.5 graphs whose stock loader nodes name real users' files
(``harness.server.DIT_STAND_INS``): the tiny stand-ins answer under those names, through the test-only shims
of ``tests/harness/tiny_dit_node``."""

from __future__ import annotations

from PIL import Image, ImageStat

from harness.graphs import Graph, out

SIZE = 64


def _finish(g: Graph, model: list, positive: list, negative: list, vae: list, cfg: float, scheduler: str) -> dict:
    latent = g.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    sampled = g.add("KSampler", model=model, seed=0, steps=2, cfg=cfg, sampler_name="euler", scheduler=scheduler,
                    positive=positive, negative=negative, latent_image=out(latent), denoise=1.0)
    decoded = g.add("VAEDecode", samples=out(sampled), vae=vae)
    g.add("SaveImage", images=out(decoded), filename_prefix="dit_stand_in")
    return g.nodes


def flux_dev_text_to_image() -> dict:
    """ComfyUI's Flux.1-dev template in small: UNETLoader + DualCLIPLoader + VAELoader, FluxGuidance 3.5, cfg 1."""
    g = Graph()
    unet = g.add("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                 type="flux")
    vae = g.add("VAELoader", vae_name="ae.safetensors")
    text = g.add("CLIPTextEncode", clip=out(clip), text="a photo of a cat")
    guided = g.add("FluxGuidance", conditioning=out(text), guidance=3.5)
    return _finish(g, out(unet), out(guided), out(guided), out(vae), 1.0, "simple")


def sd35_text_to_image() -> dict:
    """ComfyUI's SD3.5 template in small: one CheckpointLoaderSimple, cfg 4, sgm_uniform."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="sd3.5_large_fp8_scaled.safetensors")
    pos = g.add("CLIPTextEncode", clip=out(ckpt, 1), text="a photo of a cat")
    neg = g.add("CLIPTextEncode", clip=out(ckpt, 1), text="")
    return _finish(g, out(ckpt), out(pos), out(neg), out(ckpt, 2), 4.0, "sgm_uniform")


def run_and_check(srv, prompt: dict) -> None:
    from harness.server import error_message

    entry = srv.run(prompt, timeout=300, tiny=False)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    (png,) = srv.output_files(entry)
    with Image.open(png) as img:
        assert img.size == (SIZE, SIZE)
        assert max(ImageStat.Stat(img.convert("RGB")).stddev) > 0, "one flat colour (NaN?)"


def combo_options(spec: list) -> list:
    """A combo input's options from /object_info: V1 nodes list them first, V3 nodes as ["COMBO", {"options": ...}]."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_loaders_list_the_real_names(comfy_server):
    from harness.server import DIT_STAND_INS

    info = comfy_server.object_info()
    listed = {"diffusion_models": info["UNETLoader"]["input"]["required"]["unet_name"][0],
              "text_encoders": info["DualCLIPLoader"]["input"]["required"]["clip_name1"][0],
              "vae": info["VAELoader"]["input"]["required"]["vae_name"][0],
              "checkpoints": info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0],
              "ipadapter": combo_options(info["FrozenTuneFluxIPAdapterLoader"]["input"]["required"]["flux_ipadapter_file"]),
              "clip_vision": info["CLIPVisionLoader"]["input"]["required"]["clip_name"][0]}
    for folder, names in DIT_STAND_INS.items():
        assert set(names) <= set(listed[folder]), (folder, listed[folder])


def test_flux_dev_graph_runs_on_the_stand_ins(comfy_server):
    run_and_check(comfy_server, flux_dev_text_to_image())
    assert "model_type FLUX" in comfy_server.log_text()


def test_sd35_graph_runs_on_the_stand_ins(comfy_server):
    run_and_check(comfy_server, sd35_text_to_image())
