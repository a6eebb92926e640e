"""Fuzz every FrozenTune node through the HTTP API: bad numbers and bad strings get a clear error.

For each node the server lists (``GET /object_info``, ids starting "FrozenTune"), every numeric input is
set to NaN, +inf, -inf, min-1 and max+1, and every string input to "", ".", "../x", "/abs", a 300-character
name and a NUL byte, one at a time, on a small valid base graph (``harness.graphs``: 64 px, one training
step). Each case must end in a validation error at POST /prompt or an execution error that names the
input (free-text prompts may also succeed: any text is a prompt), the server must answer afterwards, and
nothing may be written outside the folders a job writes (the base directory is listed before and after).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import pytest

from harness import graphs, hostile

log = logging.getLogger(__name__)

BAD_STRINGS = {"empty": "", "dot": ".", "dotdot": "../x", "abs": "/abs", "long": "n" * 300, "nul": "a\x00b"}
# Free text (prompts, captions, a token word): any text is valid input, so success is allowed.
TEXT = {"token", "class_word", "edit_prompt", "negative", "content_text", "captions"}
# Numeric inputs whose out-of-range values the node documents as clamped instead of refused: none so far.
CLAMPED: dict[tuple[str, str], str] = {}
# Inputs fuzzed on another base graph than the node's default one.
BASE_FOR_INPUT = {
    # the folder is only read when no image inputs are connected
    ("FrozenTuneControlNetZeroTrain", "dataset_folder"):
        lambda: graphs.controlnet_zero_train(use_images=False, dataset_folder="controlnet_zero_disks"),
    # custom_blocks is only read with preset "custom"
    ("FrozenTuneInstantStyleApply", "custom_blocks"): lambda: graphs.instantstyle_apply(preset="custom"),
}
# Node ids in the order they run: the SD1.5 ones first, then the SDXL-family ones (one model switch).
NODE_ORDER = ["FrozenTuneUniTuneFineTune", "FrozenTuneUniTuneSave", "FrozenTuneUniTuneLoad",
              "FrozenTunePromptGuidanceGuider", "FrozenTuneUniTuneEdit", "FrozenTuneControlNetZeroCreate",
              "FrozenTuneControlNetZeroTrain", "FrozenTuneControlNetZeroSave", "FrozenTuneIPAdapterLoader",
              "FrozenTuneInstantStyleApply"]


def bad_numbers(spec: dict) -> dict[str, float]:
    values = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
    if "min" in spec:
        values["min-1"] = spec["min"] - 1
    if "max" in spec:
        values["max+1"] = spec["max"] + 1
    return values


def cases_for(info: dict) -> list[tuple[str, str, str, object]]:
    """(input, kind, label, value) for every numeric and string input of a node's /object_info entry."""
    cases = []
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if kind in ("INT", "FLOAT"):
                cases += [(name, kind, label, v) for label, v in bad_numbers(options).items()]
            elif kind == "STRING":
                cases += [(name, kind, label, v) for label, v in BAD_STRINGS.items()]
    return cases


def names_input(outcome: hostile.Outcome, name: str) -> bool:
    return outcome.names(name) or name.replace("_", " ") in outcome.message


def judge(node: str, name: str, kind: str, label: str, outcome: hostile.Outcome) -> str | None:
    """None if the answer is acceptable, else what is wrong with it."""
    if outcome.status == "success":
        if kind == "STRING" and name in TEXT:
            return None
        if (node, name) in CLAMPED:
            return None
        return "succeeded"
    if outcome.status == "interrupted":
        return "was interrupted"
    if not names_input(outcome, name):
        return f"{outcome.status} without naming {name}: {outcome.message[:200]}"
    return None


@pytest.fixture(scope="module")
def frozentune_info(hostile_server) -> dict:
    return {k: v for k, v in hostile_server.object_info().items() if k.startswith("FrozenTune")}


def test_fuzz_covers_every_frozentune_node(frozentune_info):
    assert sorted(frozentune_info) == sorted(NODE_ORDER), "a FrozenTune node has no fuzz base graph"


def _base(node: str, name: str, unitune_file: Path) -> graphs.Graph:
    if (node, name) in BASE_FOR_INPUT:
        return BASE_FOR_INPUT[(node, name)]()
    if node == "FrozenTuneUniTuneLoad":
        return graphs.unitune_load(unitune_file.name)
    return graphs.BASES[node]()


@pytest.mark.slow
@pytest.mark.parametrize("node", NODE_ORDER)
def test_fuzz_node_inputs(hostile_server, frozentune_info, unitune_file, node):
    srv = hostile_server
    problems, counts = [], {"refused": 0, "error": 0, "success": 0, "interrupted": 0}
    base_ok = hostile.run(srv, _base(node, "", unitune_file).prompt())
    assert base_ok.status == "success", f"the base graph of {node} fails: {base_ok.message}"
    neighbours = sorted(p.name for p in srv.base.parent.iterdir())
    started = time.monotonic()
    for name, kind, label, value in cases_for(frozentune_info[node]):
        abs_existed = Path("/abs").exists()
        before = hostile.snapshot(srv.base)
        outcome = hostile.run(srv, _base(node, name, unitune_file).prompt(**{name: value}), timeout=300)
        after = hostile.snapshot(srv.base)
        counts[outcome.status] += 1
        where = f"{name}={label}"
        verdict = judge(node, name, kind, label, outcome)
        if verdict:
            problems.append(f"{where}: {verdict}")
        leaked = hostile.leaks(hostile.changes(before, after))
        if leaked:
            problems.append(f"{where}: wrote outside the job folders: {leaked[:5]}")
        if not abs_existed and Path("/abs").exists():
            shutil.rmtree("/abs") if Path("/abs").is_dir() else Path("/abs").unlink()
            problems.append(f"{where}: created /abs on the host")
        if sorted(p.name for p in srv.base.parent.iterdir()) != neighbours:
            problems.append(f"{where}: wrote beside the base directory")
        assert srv.proc.poll() is None, f"the server died at {where}:\n{srv.log_tail()}"
        srv.get("/system_stats", timeout=10)  # still answers
    log.warning("fuzz %s: %s in %.1f s", node, counts, time.monotonic() - started)
    assert not problems, f"{node}: {len(problems)} bad answer(s):\n" + "\n".join(problems)
