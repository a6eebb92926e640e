"""ControlNet-Zero encode cache: rows stream to shards as they are encoded (issue 12, item 6).

``_encode_rows`` with a cache folder writes a shard once its rows reach ``SHARD_BYTES``, so it never
holds the whole encoded set; every row reads back from the shards; an earlier run's shards are
replaced; a damaged shard is named with the fix.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from harness import comfy_env

ROW = 1024  # float32 values per row: 4 KiB


@pytest.fixture(scope="module")
def cache():
    comfy_env.import_pack()
    from frozentune.controlnet_zero import cache

    return cache


def test_rows_stream_to_shards_and_at_most_one_shard_is_held(cache, tmp_path, monkeypatch):
    import safetensors.torch

    from frozentune.controlnet_zero.distributed import Dist

    monkeypatch.setattr(cache, "SHARD_BYTES", 3 * ROW * 4, raising=False)  # a shard per 3+ rows
    stale = tmp_path / "images.rank0.00007.safetensors"
    safetensors.torch.save_file({"99.latent": torch.zeros(1)}, str(stale))
    alive: weakref.WeakSet = weakref.WeakSet()
    most_alive = []
    written = []
    plain = safetensors.torch.save_file

    def save_file(tensors, path, *args, **kwargs):
        written.append(sorted({int(k.split(".")[0]) for k in tensors}))
        return plain(tensors, path, *args, **kwargs)

    def encode(rows):
        most_alive.append(len(alive))  # rows encoded earlier and still referenced
        out = [{"latent": torch.full((ROW,), float(i))} for i in rows]
        alive.update(r["latent"] for r in out)
        return out

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    rows = cache._encode_rows(list(range(12)), encode, "images", tmp_path, Dist(), 2)
    assert max(most_alive) <= 4, most_alive  # one shard's rows (3, rounded up to whole chunks of 2), never all 12
    assert written == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], written
    assert not stale.exists(), "an earlier run's shard must not be read as this run's"
    assert len(rows) == 12 and all(torch.equal(rows[i]["latent"], torch.full((ROW,), float(i))) for i in range(12))


def test_a_damaged_shard_is_named_with_the_fix(cache, tmp_path):
    bad = tmp_path / "images.rank0.00000.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=rf"{bad}.*could not be read.*Save, copy or download it again"):
        cache.Rows(files=[bad])
