"""ControlNet-Zero CLI: the optimizer and precision settings reach TrainSettings from the TOML and flags."""

from __future__ import annotations

import pytest

from harness import comfy_env


@pytest.fixture(scope="module")
def train_module():
    comfy_env.import_pack()
    from frozentune.controlnet_zero import train

    return train


def config(tmp_path, *lines: str):
    path = tmp_path / "train.toml"
    path.write_text("\n".join(['checkpoint = "base.safetensors"', 'dataset = "set"', 'output = "out/cn.safetensors"',
                               *lines]))
    return path


def test_optimizer_from_toml_and_flag(train_module, tmp_path):
    _, settings = train_module.options(["--config", str(config(tmp_path, 'optimizer = "adamw8bit"'))])
    assert settings.optimizer == "adamw8bit"
    _, settings = train_module.options(["--config", str(config(tmp_path, 'optimizer = "adamw8bit"')),
                                        "--optimizer", "adamw", "--mixed-precision", "bf16"])
    assert (settings.optimizer, settings.mixed_precision) == ("adamw", "bf16")
    _, settings = train_module.options(["--config", str(config(tmp_path))])
    assert settings.optimizer == "adamw"


def test_unknown_optimizer_is_refused_with_the_choices(train_module, tmp_path):
    with pytest.raises(ValueError, match="optimizer 'adam8' is unknown: use one of adamw, adamw8bit"):
        train_module.options(["--config", str(config(tmp_path, 'optimizer = "adam8"'))])
