"""ControlNet-Zero CLI: the optimizer and precision settings reach TrainSettings from the TOML and flags."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("word, expected", [("false", False), ("0", False), ("no", False), ("off", False),
                                            ("true", True), ("1", True), ("yes", True), ("ON", True)])
def test_boolean_flags_read_as_booleans(train_module, tmp_path, word, expected):
    """Issue 12: `--resume false` used to become Path("false")."""
    opts, settings = train_module.options(["--config", str(config(tmp_path)), "--resume", word,
                                           "--gradient-checkpointing", word])
    assert opts["resume"] is expected and settings.gradient_checkpointing is expected
    opts, settings = train_module.options(["--config", str(config(tmp_path, f'resume = "{word}"',
                                                                   f"gradient_checkpointing = {str(expected).lower()}"))])
    assert opts["resume"] is expected and settings.gradient_checkpointing is expected


def test_resume_may_name_a_checkpoint_folder(train_module, tmp_path):
    (tmp_path / "step_000010").mkdir()
    opts, _ = train_module.options(["--config", str(config(tmp_path)), "--resume", str(tmp_path / "step_000010")])
    assert opts["resume"] == tmp_path / "step_000010"


@pytest.mark.parametrize("flag, value, message", [
    ("--resume", "maybe", r"--resume 'maybe' is neither a boolean \(true/1/yes/on or false/0/no/off\) nor an existing"),
    ("--gradient-checkpointing", "nope", r"--gradient-checkpointing 'nope' is not a boolean: use one of true/1/yes/on"),
])
def test_other_boolean_words_are_refused_clearly(train_module, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as stop:
        train_module.options(["--config", str(config(tmp_path)), flag, value])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit, match=message):  # the same words from the config file
        key = flag[2:].replace("-", "_")
        train_module.options(["--config", str(config(tmp_path, f'{key} = "{value}"'))])


def flag_helps(train_module) -> dict[str, str]:
    parser = train_module._parser(train_module._settings_fields())
    return {a.option_strings[0][2:].replace("-", "_"): a.help for a in parser._actions if a.option_strings != ["-h", "--help"]}


def test_every_flag_has_the_help_text_of_its_setting(train_module):
    from frozentune.controlnet_zero import texts

    helps = flag_helps(train_module)
    assert len(helps) == 31, sorted(helps)  # --config + 16 run keys + 14 TrainSettings fields
    assert all(helps[name] and helps[name] == texts.cli_text(name) for name in helps), \
        [n for n in helps if helps[n] != texts.cli_text(n)]
    assert not [n for n, t in {**texts.TEXTS, **texts.CLI_MORE}.items() if "%" in t], "argparse reads % as a format"
    assert set(texts.CLI_MORE) <= set(helps), "detail for a flag that does not exist"
    assert helps["resume"].startswith(texts.TEXTS["resume"] + " ") and "work_dir" in helps["resume"]
    train_module._parser(train_module._settings_fields()).format_help()  # renders


def test_flag_help_starts_with_the_node_tooltip_of_the_same_setting(train_module, pack):
    """The CLI may say more (it has no help page) but never something else."""
    from frozentune.controlnet_zero import texts
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave, ControlNetZeroTrain

    tooltips = {i.id: i.tooltip for node in (ControlNetZeroTrain, ControlNetZeroSave)
                for i in node.define_schema().inputs}
    helps = flag_helps(train_module)
    shared = {flag: texts.CLI_TO_NODE.get(flag, flag) for flag in helps}
    shared = {flag: node for flag, node in shared.items() if node in tooltips}
    assert len(shared) >= 13, shared  # steps, batch_size, ..., resume, optimizer, save_dtype->dtype
    assert all(helps[flag] == tooltips[node] or helps[flag].startswith(tooltips[node] + " ")
               for flag, node in shared.items()), \
        [f for f, n in shared.items() if not helps[f].startswith(tooltips[n])]
