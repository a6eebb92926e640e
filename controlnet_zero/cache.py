"""Encode the dataset once: VAE latents per image, text conditionings per unique caption.

Training then never runs the VAE or the text encoder. Small sets stay in memory; with a cache
folder every rank writes the rows it encodes to safetensors shards as it goes (a shard once its rows
reach ``SHARD_BYTES``, so at most one shard's rows are held), and all ranks read every shard lazily
(so a large set is neither held in memory nor encoded twice). The cache is not reused across runs:
its owner removes it when training ends (the node in ComfyUI's temp folder, the CLI in its work_dir).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage import safetensors_file as weights_file
from ..training.conditioning import training_conds
from .dataset import Pair, chunks, load_pairs
from .dataset import fingerprint as dataset_fingerprint
from .distributed import Dist

log = logging.getLogger(__name__)

EMPTY = ""  # the caption a dropped prompt is replaced with (encoded, as in the ControlNet paper)
SHARD_BYTES = 256 * 2**20  # a cache shard is written once the rows it collects reach this size


class Rows:
    """Row ``i`` -> ``{name: tensor}``, from memory or from safetensors shards read lazily."""

    def __init__(self, memory: dict[int, dict[str, torch.Tensor]] | None = None,
                 files: Sequence[Path] = ()):
        self._memory = memory or {}
        self._where: dict[int, tuple[object, list[str]]] = {}
        self._handles = []
        if files:
            for path in files:
                handle = weights_file.open_lazy(path)
                self._handles.append(handle)
                for key in handle.keys():
                    row, _, name = key.partition(".")
                    self._where.setdefault(int(row), (handle, []))[1].append(name)

    def __len__(self) -> int:
        return len(self._memory) + len(self._where)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._memory:
            return self._memory[i]
        handle, names = self._where[i]
        return {name: handle.get_tensor(f"{i}.{name}") for name in names}


def _cpu(row: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in row.items()}


def _write_shard(path: Path, rows: dict[int, dict[str, torch.Tensor]]) -> None:
    """One shard: row ``i``'s tensor ``k`` under ``"i.k"`` (written to a temp name, then renamed)."""
    import safetensors.torch

    tmp = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file({f"{i}.{k}": v for i, row in rows.items() for k, v in row.items()}, str(tmp))
    tmp.replace(path)


def shard_files(cache_dir: Path, name: str, world: int = 1) -> list[Path]:
    """The shards of ``name`` every rank wrote into ``cache_dir``."""
    return [p for r in range(world) for p in sorted(Path(cache_dir).glob(f"{name}.rank{r}.*.safetensors"))]


def _encode_rows(indices: list[int], encode: Callable[[list[int]], list[dict[str, torch.Tensor]]], name: str,
                 cache_dir: Path | None, dist: Dist, chunk: int, shard_bytes: int | None = None) -> Rows:
    """Encode this rank's share of ``indices``; with ``cache_dir``, stream it into shards shared by all ranks."""
    mine = indices[dist.rank::dist.world]
    if cache_dir is None:
        if dist.enabled:
            raise ValueError("several processes need a cache folder to share the encoded dataset: set cache_dir.")
        return Rows(memory={i: _cpu(row) for part in chunks(mine, chunk)
                            for i, row in zip(part, encode(part), strict=True)})
    shard_bytes = SHARD_BYTES if shard_bytes is None else shard_bytes
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob(f"{name}.rank{dist.rank}.*.safetensors"):  # an earlier run's shards
        old.unlink()
    pending: dict[int, dict[str, torch.Tensor]] = {}
    held, written = 0, 0
    for part in chunks(mine, chunk):
        for i, row in zip(part, encode(part), strict=True):
            pending[i] = _cpu(row)
            held += sum(v.nbytes for v in pending[i].values())
        if held >= shard_bytes:
            _write_shard(cache_dir / f"{name}.rank{dist.rank}.{written:05d}.safetensors", pending)
            pending, held, written = {}, 0, written + 1
    if pending or not written:
        _write_shard(cache_dir / f"{name}.rank{dist.rank}.{written:05d}.safetensors", pending)
    dist.barrier()
    return Rows(files=shard_files(cache_dir, name, dist.world))


@dataclass
class TrainingData:
    """Everything a training step reads: latents (model space), RGB hints, text conditionings."""

    images: Rows  # row i: {"latent": [C, h, w] float32, "hint": [R, R, 3] uint8, or latent hints [C, h, w] float}
    texts: Rows  # row j: the model's extra conds (c_crossattn; y: SDXL, SD3, Flux; Flux guidance) for caption j; 0 = EMPTY
    caption_ids: torch.Tensor  # [N] long, index into texts
    resolution: int
    fingerprint: str = ""  # the dataset's (Source.fingerprint); "" when unknown

    def __len__(self) -> int:
        return int(self.caption_ids.shape[0])

    def batch(self, indices: torch.Tensor, dropped: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(x0 [B, C, h, w], hint [B, 3, R, R] in [0, 1], conds) for rows ``indices``; ``dropped`` -> EMPTY caption."""
        import comfy.conds

        rows = [self.images[int(i)] for i in indices]
        x0 = torch.stack([r["latent"] for r in rows]).to(device, torch.float32)
        hint = torch.stack([r["hint"] for r in rows]).to(device)
        if hint.dtype == torch.uint8:  # pixel hints [B, R, R, 3] -> [B, 3, R, R] in [0, 1]
            hint = hint.movedim(-1, 1).float() / 255.0
        else:  # latent hints (``layouts``: hint_input), already [B, C, h, w] as the control module takes them
            hint = hint.float()
        texts = [self.texts[0 if bool(d) else int(self.caption_ids[int(i)])] for i, d in zip(indices, dropped, strict=True)]
        conds = {}
        for name in texts[0]:
            parts = [t[name] for t in texts]
            if name == "c_crossattn":  # captions of different token lengths: repeat to a common length as ComfyUI does
                merged = comfy.conds.CONDCrossAttn(parts[0]).concat([comfy.conds.CONDCrossAttn(p) for p in parts[1:]])
            else:
                merged = torch.cat(parts)
            conds[name] = merged.to(device)
        return x0, hint, conds


class Source:
    """What to encode: ``count`` items, their captions, and a loader for a list of rows."""

    def __init__(self, count: int, captions: list[str],
                 load: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]], fingerprint: str = ""):
        self.count, self.captions, self.load, self.fingerprint = count, captions, load, fingerprint

    @classmethod
    def from_pairs(cls, pairs: list[Pair], resolution: int) -> Source:
        return cls(len(pairs), [p.caption for p in pairs], lambda rows: load_pairs([pairs[i] for i in rows], resolution),
                   dataset_fingerprint(pairs))

    @classmethod
    def from_tensors(cls, targets: torch.Tensor, hints: torch.Tensor, captions: list[str]) -> Source:
        """``targets``/``hints`` ``[N, R, R, 3]`` float in [0, 1] (already fitted)."""
        def load(rows):
            return targets[rows], (hints[rows].clamp(0, 1) * 255).round().to(torch.uint8)
        digest = hashlib.sha256()
        for t in (targets, hints):
            digest.update(str(tuple(t.shape)).encode() + t.detach().float().contiguous().cpu().numpy().tobytes())
        digest.update("\0".join(captions).encode("utf-8"))
        return cls(targets.shape[0], captions, load, digest.hexdigest())


def encode(source: Source, base_model, vae, clip, resolution: int, cache_dir: Path | None = None,
           dist: Dist | None = None, chunk: int = 8, guidance: float | None = None,
           hint_input: Callable[[torch.Tensor, object], torch.Tensor] | None = None) -> TrainingData:
    """Run the VAE over every target and the text encoder over every unique caption, once.

    ``base_model`` is the base ``comfy.model_base.BaseModel``: its latent format maps VAE latents to
    model space, and its ``extra_conds`` build the UNet inputs (SDXL pooled/size conditioning at the
    training resolution, Flux's pooled vector) exactly as sampling does. ``guidance``: the guidance value a
    guidance-embedding model (Flux.1 dev) trains at, in every caption's conds; None: the model's own default
    (other families take none). ``hint_input``: the layout's (``layouts``), what a row keeps of its hint;
    None keeps the uint8 pixels.
    """
    dist = dist or Dist()
    unique = [EMPTY] + sorted(set(source.captions) - {EMPTY})
    index = {c: j for j, c in enumerate(unique)}
    caption_ids = torch.tensor([index[c] for c in source.captions], dtype=torch.long)
    channels = getattr(base_model.latent_format, "latent_channels", 4)
    latent_like = torch.zeros(1, channels, resolution // 8, resolution // 8)

    def encode_images(rows: list[int]) -> list[dict[str, torch.Tensor]]:
        targets, hints = source.load(rows)
        pixels = targets.float() / 255.0 if targets.dtype == torch.uint8 else targets
        if getattr(vae, "latent_dim", 2) == 3 and not getattr(vae, "not_video", True):  # video VAE (Qwen-Image's
            # Wan-2.1): a batch would be one video's frames, so each image is encoded alone (as sampling does)
            latents = torch.cat([vae.encode(pixels[i:i + 1]).float().cpu() for i in range(pixels.shape[0])])
        else:
            latents = vae.encode(pixels).float().cpu()
        latents = base_model.latent_format.process_in(latents)
        if hint_input is not None:
            hints = hint_input(hints, vae)
        return [{"latent": lat, "hint": h} for lat, h in zip(latents, hints, strict=True)]

    def encode_texts(rows: list[int]) -> list[dict[str, torch.Tensor]]:
        out = []
        for j in rows:
            conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(unique[j]))
            if guidance is not None:
                conditioning = [[c, {**extras, "guidance": guidance}] for c, extras in conditioning]
            out.append(training_conds(base_model, conditioning, latent_like, torch.device("cpu")))
        return out

    # no_grad: the VAE's and text encoder's weights may require grad, and under ComfyUI's executor they are
    # inference tensors that autograd must never record.
    with torch.no_grad():
        images = _encode_rows(list(range(source.count)), encode_images, "images", cache_dir, dist, chunk)
        texts = _encode_rows(list(range(len(unique))), encode_texts, "texts", cache_dir, dist, chunk)
    log.info("ControlNet-Zero: encoded %d pairs and %d unique captions at %dpx", source.count, len(unique), resolution)
    return TrainingData(images, texts, caption_ids, resolution, source.fingerprint)
