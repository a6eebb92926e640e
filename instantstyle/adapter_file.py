"""IP-Adapter weight files: the public key layouts, read into one immutable object, with their kind detected.

The h94/IP-Adapter files come as ``.bin`` (a pickled ``{"image_proj": ..., "ip_adapter": ...}`` dict) or as
``.safetensors`` with ``image_proj.*`` / ``ip_adapter.*`` keys; training checkpoints use
``image_proj_model.*`` / ``adapter_modules.*``. The cross-attention weights are numbered ``1, 3, 5, ...``:
one per attn2 layer, in diffusers' processor order (down, up, mid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage import safetensors_file as weights_file

PREFIXES = {
    "image_proj.": "image_proj",
    "image_proj_model.": "image_proj",
    "ip_adapter.": "ip_adapter",
    "adapter_modules.": "ip_adapter",
}
FAMILY_BY_CROSS_DIM = {768: "sd15", 2048: "sdxl"}
# Width of the embedding a projection eats -> the CLIP vision encoder it was trained with.
ENCODER_BY_EMBED_WIDTH = {"plain": {1024: "ViT-H", 1280: "ViT-bigG", 768: "ViT-L"},
                          "plus": {1280: "ViT-H", 1664: "ViT-bigG", 1024: "ViT-L"}}
LAYER_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
RESAMPLER_DIM_HEAD = 64  # fixed in IP-Adapter's Resampler


class IPAdapterFileError(ValueError):
    pass


@dataclass(frozen=True, eq=False)
class IPAdapter:
    """An IP-Adapter's weights (never modified after loading) and what they fit."""

    name: str
    projection: str  # "plain" (4-token ImageProjModel) | "plus" (Resampler over patch tokens)
    cross_dim: int  # the UNet context width the tokens are made for (768 SD1.5, 2048 SDXL)
    embed_width: int  # width of the CLIP-vision feature it eats (image_embeds, or penultimate tokens for Plus)
    tokens: int  # image tokens per image
    image_proj: dict[str, torch.Tensor]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (to_k_ip, to_v_ip) per attn2 layer, in order

    @property
    def family(self) -> str:
        return FAMILY_BY_CROSS_DIM.get(self.cross_dim, f"{self.cross_dim}-d")

    @property
    def encoder(self) -> str:
        return ENCODER_BY_EMBED_WIDTH[self.projection].get(self.embed_width, f"{self.embed_width}-d")

    def describe(self) -> str:
        kind = "Plus (Resampler)" if self.projection == "plus" else "plain"
        return (f"{self.name}: {self.family} ({self.cross_dim}-d context), {kind} projection, {self.tokens} tokens, "
                f"{self.encoder} image features ({self.embed_width}-d), {len(self.layers)} cross-attention layers")

    def __deepcopy__(self, memo):  # immutable: ModelPatcher.clone() must share, not copy, the weights
        return self


def read_state_dict(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a ``.safetensors`` or legacy ``.bin`` file.

    Every read error names the file and says what to do; tensors holding NaN or infinity are refused
    (they would make every image black).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        flat, _ = weights_file.load(path)
    elif suffix in (".bin", ".pt", ".pth", ".ckpt"):
        flat = _load_legacy(path)
    else:
        raise IPAdapterFileError(f"{path.name}: unsupported file type {suffix!r}; use .safetensors or .bin.")
    sections = split_sections(flat, path.name)
    for section, tensors in sections.items():
        weights_file.check_finite({f"{section}.{k}": v for k, v in tensors.items() if isinstance(v, torch.Tensor)},
                                  source=path.name)
    return sections


def _load_legacy(path: Path) -> dict:
    """A pickled ``.bin``, unpickled weights-only (plain tensors and containers, never code)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file): pick a file from the list again, "
                                "or refresh the page if it was removed.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or objects beyond plain tensors (refused by weights_only)
        reason = str(err).strip().split("\n", 1)[0] or type(err).__name__
        raise IPAdapterFileError(f"{path} could not be read as a weights-only torch file ({reason}): it is "
                                 "truncated, corrupt or holds more than plain tensors. Download or copy it again, "
                                 "or convert it to .safetensors.") from err


def split_sections(flat: dict, name: str = "IP-Adapter") -> dict[str, dict[str, torch.Tensor]]:
    if not isinstance(flat, dict):
        raise IPAdapterFileError(f"{name} does not hold a state dict.")
    if isinstance(flat.get("image_proj"), dict) and isinstance(flat.get("ip_adapter"), dict):
        return {"image_proj": dict(flat["image_proj"]), "ip_adapter": dict(flat["ip_adapter"])}
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        for prefix, section in PREFIXES.items():
            if key.startswith(prefix):
                out[section][key[len(prefix):]] = value
                break
    if not out["image_proj"] or not out["ip_adapter"]:
        sample = ", ".join(sorted(flat)[:4])
        raise IPAdapterFileError(f"{name} is not an IP-Adapter file: it needs 'image_proj.*' and 'ip_adapter.*' "
                                 f"keys (found e.g. {sample}).")
    return out


def _projection_kind(proj: dict[str, torch.Tensor], name: str) -> tuple[str, int, int, int]:
    """(kind, cross_dim, embed_width, tokens) from the image-projection keys."""
    if "latents" in proj and "proj_in.weight" in proj and "proj_out.weight" in proj:
        return "plus", proj["proj_out.weight"].shape[0], proj["proj_in.weight"].shape[1], proj["latents"].shape[1]
    if "proj.weight" in proj and "norm.weight" in proj:
        cross = proj["norm.weight"].shape[0]
        return "plain", cross, proj["proj.weight"].shape[1], proj["proj.weight"].shape[0] // cross
    if "proj.3.weight" in proj:
        other = "IP-Adapter Full (MLP projection)"
    elif any(k.startswith("perceiver_resampler.") for k in proj):
        other = "IP-Adapter FaceID Plus"
    elif "proj.0.weight" in proj:
        other = "IP-Adapter FaceID"
    else:
        other = "an unknown projection"
    raise IPAdapterFileError(f"{name} is {other}; InstantStyle supports the plain (4-token) and Plus "
                             "(Resampler) IP-Adapters, e.g. ip-adapter_sdxl or ip-adapter-plus_sdxl_vit-h.")


def _layers(ip: dict[str, torch.Tensor], cross_dim: int, name: str) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    if any("lora" in k for k in ip):
        raise IPAdapterFileError(f"{name} carries LoRA weights (a FaceID adapter), which InstantStyle does not run.")
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ip.items():
        m = LAYER_KEY.match(key)
        if m is None:
            raise IPAdapterFileError(f"{name}: unexpected cross-attention key 'ip_adapter.{key}'.")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    ids = sorted(found)
    if ids != list(range(1, 2 * len(ids) + 1, 2)) or any(len(found[i]) != 2 for i in ids):
        raise IPAdapterFileError(f"{name}: cross-attention weights must be numbered 1, 3, 5, ... with to_k_ip and "
                                 f"to_v_ip each; found ids {ids[:6]}{'...' if len(ids) > 6 else ''}.")
    layers = []
    for i in ids:
        k, v = found[i]["k"], found[i]["v"]
        if k.ndim != 2 or k.shape != v.shape or k.shape[1] != cross_dim:
            raise IPAdapterFileError(f"{name}: layer {i} has to_k_ip {tuple(k.shape)} / to_v_ip {tuple(v.shape)}, "
                                     f"expected [hidden, {cross_dim}] for both.")
        layers.append((k, v))
    return tuple(layers)


def from_sections(sections: dict[str, dict[str, torch.Tensor]], name: str = "IP-Adapter") -> IPAdapter:
    """Detect the kind of an IP-Adapter from its keys and shapes, and check it is consistent."""
    proj = sections["image_proj"]
    kind, cross_dim, embed_width, tokens = _projection_kind(proj, name)
    if kind == "plus" and proj["layers.0.0.to_q.weight"].shape[0] % RESAMPLER_DIM_HEAD:
        raise IPAdapterFileError(f"{name}: Resampler width {proj['layers.0.0.to_q.weight'].shape[0]} is not a "
                                 f"multiple of its {RESAMPLER_DIM_HEAD}-wide heads.")
    return IPAdapter(name=name, projection=kind, cross_dim=int(cross_dim), embed_width=int(embed_width),
                     tokens=int(tokens), image_proj=dict(proj),
                     layers=_layers(sections["ip_adapter"], cross_dim, name))


def load(path: Path) -> IPAdapter:
    path = Path(path)
    return from_sections(read_state_dict(path), path.name)
