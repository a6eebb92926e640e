"""Re-queue after delete: a Save node whose file is gone runs again, through ComfyUI's own executor cache."""

from __future__ import annotations

from pathlib import Path

import pytest


class _QuietServer:
    """What PromptExecutor needs of PromptServer, without a web server."""

    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs) -> None:
        pass


@pytest.fixture
def save_node(pack, tmp_path, monkeypatch):
    """A minimal V3 Save node (a linked text input and a filename widget) wired to saved_files."""
    import nodes
    from comfy_api.latest import io

    from frozentune.nodes import saved_files

    writes: list[Path] = []

    class Text(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="FrozenTuneTestText", inputs=[io.String.Input("text")],
                             outputs=[io.String.Output()])

        @classmethod
        def execute(cls, text):
            return io.NodeOutput(text)

    class Save(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="FrozenTuneTestSave", is_output_node=True,
                             inputs=[io.String.Input("text"), io.String.Input("filename")],
                             outputs=[io.String.Output()])

        @classmethod
        def fingerprint_inputs(cls, text=None, filename=None):
            return saved_files.fingerprint("FrozenTuneTestSave", filename=filename)

        @classmethod
        def execute(cls, text, filename):
            path = tmp_path / f"{filename}_{len(writes)}.txt"
            path.write_text(text)
            writes.append(path)
            saved_files.remember("FrozenTuneTestSave", path, filename=filename)
            return io.NodeOutput(str(path))

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "FrozenTuneTestText", Text)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "FrozenTuneTestSave", Save)
    return Save, writes


PROMPT = {
    "1": {"class_type": "FrozenTuneTestText", "inputs": {"text": "hello"}},
    "2": {"class_type": "FrozenTuneTestSave", "inputs": {"text": ["1", 0], "filename": "out"}},
}


def test_node_level_fingerprint_changes_only_when_the_file_is_gone(save_node):
    from comfy_execution.utils import CurrentNodeContext

    save, writes = save_node
    with CurrentNodeContext("p", "2"):
        first = save.fingerprint_inputs(text=None, filename="out")
        save.execute(text="hello", filename="out")
        assert save.fingerprint_inputs(text=None, filename="out") == first
        with CurrentNodeContext("p", "7"):  # another Save node's records are its own
            assert save.fingerprint_inputs(text=None, filename="out") == first
        writes[0].unlink()
        gone = save.fingerprint_inputs(text=None, filename="out")
        assert gone != first
        assert save.fingerprint_inputs(text=None, filename="out") == gone  # stable until the next delete
        save.execute(text="hello", filename="out")
        assert writes[1].exists()
        assert save.fingerprint_inputs(text=None, filename="out") == gone
        writes[1].unlink()
        assert save.fingerprint_inputs(text=None, filename="out") not in (first, gone)  # never goes back


def test_executor_reruns_save_after_its_file_was_deleted(save_node):
    import copy

    import execution

    save, writes = save_node
    executor = execution.PromptExecutor(_QuietServer(), cache_args={"lru": 0, "ram": 0})

    def run() -> str:
        executor.execute(copy.deepcopy(PROMPT), "prompt", {}, ["2"])
        assert executor.success
        return executor.caches.outputs.get("2").outputs[0][0]

    first = run()
    assert Path(first).exists() and len(writes) == 1
    assert run() == first and len(writes) == 1  # identical prompt: ComfyUI's cache answers, nothing written
    Path(first).unlink()
    again = run()
    assert len(writes) == 2 and Path(again).exists(), "re-queued after delete returned a path that is gone"
    assert run() == again and len(writes) == 2
