"""ControlNet-Zero output names: a name the stock loader would read as a shuffle ControlNet is refused up front."""

from __future__ import annotations

import pytest
import torch

from harness import comfy_env


@pytest.fixture(scope="module")
def pack():
    comfy_env.import_pack()
    from frozentune.controlnet_zero import controlnet_file as files
    from frozentune.controlnet_zero import train

    return files, train


@pytest.mark.parametrize("name", ["style_shuffle.safetensors", "cz/style_shuffle_fp16.safetensors"])
def test_shuffle_stem_is_refused_and_nothing_is_written(pack, tmp_path, name):
    files, _ = pack
    path = tmp_path / name
    with pytest.raises(ValueError, match=r"ends in _shuffle.*Choose another name, e\.g\. 'style_shuffled'"):
        files.save(path, torch.nn.Linear(2, 2), {})
    assert not path.exists()


def test_other_stems_are_saved(pack, tmp_path):
    files, _ = pack
    path = files.save(tmp_path / "shuffled_hints.safetensors", torch.nn.Linear(2, 2), {})
    assert path.exists()


def test_cli_refuses_a_shuffle_output_before_training(pack, tmp_path):
    _, train = pack
    config = tmp_path / "train.toml"
    config.write_text('checkpoint = "base.safetensors"\ndataset = "set"\noutput = "out/edges_shuffle.safetensors"\n')
    with pytest.raises(SystemExit, match="output: File name 'edges_shuffle.safetensors' ends in _shuffle"):
        train.options(["--config", str(config)])
