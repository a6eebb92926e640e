"""Save names and user paths: what is refused, what is allowed, and that a refusal reveals nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; storage/ needs no ComfyUI
from frozentune.storage import names, user_paths  # noqa: E402


@pytest.fixture
def folders(tmp_path):
    return {"unitune": tmp_path / "models" / "unitune", "loras": tmp_path / "models" / "loras"}


@pytest.mark.parametrize("value, folder, stem", [
    ("alice", "unitune", "alice"),
    ("alice.safetensors", "unitune", "alice"),
    ("unitune/alice", "unitune", "alice"),
    ("loras/alice", "loras", "alice"),
    ("people/alice", "unitune", "people/alice"),
    ("loras\\people\\alice", "loras", "people/alice"),
    ("  alice  ", "unitune", "alice"),
])
def test_save_target_allowed(folders, value, folder, stem):
    assert names.save_target(value, input_name="filename", folders=folders, default="unitune") == (folders[folder], stem)


@pytest.mark.parametrize("value, reason", [
    ("", "empty"), (".", "not a file or folder name"), ("..", "not a file or folder name"),
    ("../x", "not a file or folder name"), ("unitune/../../x", "not a file or folder name"),
    ("/abs/path", "absolute"), ("~/x", "absolute"), ("C:/x", "absolute"), ("\\\\server\\x", "absolute"),
    ("checkpoints/x", "another loader's folder"), ("embeddings/x", "another loader's folder"),
    (".hidden", "hidden"), ("unitune/", "not a file or folder name"), ("a" * 300, "characters long"),
    ("a\x00b", "NUL"), ("a*b", "contains"), ("a\nb", "contains"), ("x/ y", "space"),
])
def test_save_target_refused(folders, value, reason):
    with pytest.raises(ValueError, match="filename .* is refused") as error:
        names.save_target(value, input_name="filename", folders=folders, default="unitune")
    assert reason in str(error.value)
    assert "'unitune/...', 'loras/...'" in str(error.value)  # says what is allowed


def test_save_target_refuses_a_link_out(folders, tmp_path):
    folders["unitune"].mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", folders["unitune"] / "link")
    with pytest.raises(ValueError, match="outside models/unitune"):
        names.save_target("link/x", input_name="filename", folders=folders, default="unitune")


@pytest.mark.parametrize("value", ["", ".", "..", "a/b", "a\\b", ".x", "x" * 121, "a\x00"])
def test_plain_name_refused(value):
    with pytest.raises(ValueError, match="run_name .* is refused"):
        names.plain_name(value, input_name="run_name", example="my_run")


def test_plain_name_allowed():
    assert names.plain_name(" my_run-2 ", input_name="run_name", example="my_run") == "my_run-2"


@pytest.fixture
def input_dir(tmp_path):
    (tmp_path / "input" / "set").mkdir(parents=True)
    return tmp_path / "input"


def test_resolve_inside_input(input_dir):
    roots = user_paths.roots(input_dir)
    assert user_paths.resolve("set", input_name="dataset_folder", roots=roots) == input_dir / "set"
    assert user_paths.resolve(str(input_dir / "set"), input_name="dataset_folder", roots=roots) == input_dir / "set"
    assert user_paths.resolve("set/../set/a.png", input_name="x", roots=roots) == input_dir / "set" / "a.png"
    # a manifest's relative entries start at the manifest's folder
    assert user_paths.resolve("a.png", input_name="x", roots=roots, base=input_dir / "set") == input_dir / "set" / "a.png"


@pytest.mark.parametrize("value", ["/etc", "~", "~/x", "../../../../etc", "/", "", "set/../../x", "a\x00b"])
def test_resolve_refuses_outside_and_tells_nothing(input_dir, value):
    roots = user_paths.roots(input_dir)
    with pytest.raises(ValueError) as error:
        user_paths.resolve(value, input_name="dataset_folder", roots=roots)
    message = str(error.value).replace(repr(value), "<value>")
    with pytest.raises(ValueError) as other:  # an outside path that does not exist reads the same
        user_paths.resolve("/no/such/folder", input_name="dataset_folder", roots=roots)
    assert message == str(other.value).replace(repr("/no/such/folder"), "<value>")
    assert "FROZENTUNE_DATA_DIRS" in message


def test_resolve_refuses_a_name_no_file_system_allows(input_dir):
    # before: Path.is_dir raised the raw "[Errno 36] File name too long" for such a dataset_folder
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        user_paths.resolve("n" * 300, input_name="dataset_folder", roots=user_paths.roots(input_dir))
    assert user_paths.resolve("n" * 255, input_name="dataset_folder", roots=user_paths.roots(input_dir))


def test_resolve_refuses_a_link_out(input_dir, tmp_path):
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", input_dir / "link")
    with pytest.raises(ValueError, match="is refused"):
        user_paths.resolve("link", input_name="dataset_folder", roots=user_paths.roots(input_dir))


def test_admin_folders_from_environment(input_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv(user_paths.ENV, os.pathsep.join([str(data), "relative/ignored", ""]))
    roots = user_paths.roots(input_dir)
    assert roots == [input_dir, data]
    assert user_paths.resolve(str(data / "set"), input_name="dataset_folder", roots=roots) == data / "set"
    with pytest.raises(ValueError):
        user_paths.resolve(str(tmp_path / "datax"), input_name="dataset_folder", roots=roots)  # prefix, not inside
    assert Path("relative/ignored") not in roots
