"""Fuzz every FrozenTune node through the HTTP API: bad numbers and bad strings get a clear error.

For each node the server lists (``GET /object_info``, ids starting "FrozenTune"), every numeric input is
set to NaN, +inf, -inf, min-1 and max+1, every string input to "", ".", "../x", "/abs", a 300-character
name and a NUL byte, and every choice input to an unknown value, one at a time, on a small valid base graph (``harness.graphs``: 64 px, one training
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
TEXT = {"token", "class_word", "edit_prompt", "negative", "content_text", "captions", "init_text"}
# Optional strings whose empty value is their default and means "not used" (UniTune's embedding: no given word).
EMPTY_IS_OFF = {("FrozenTuneUniTuneFineTune", "embedding")}
# Numeric inputs whose out-of-range values the node documents as clamped instead of refused: none so far.
CLAMPED: dict[tuple[str, str], str] = {}
# Cases that still fail, waiting for a fix: (node, "input=label") -> the missing fix. Strict: such a case that
# passes fails the test until it is removed from here; any other bad answer fails it at once.
# (dataset_folder=long, a raw 'File name too long' OSError, was fixed by 49cdb88 in storage.user_paths;
# UniTune Edit sampler_name=unknown, a raw AttributeError, by nodes.checks.choice.)
KNOWN: dict[tuple[str, str], str] = {}
# Inputs fuzzed on another base graph than the node's default one.
BASE_FOR_INPUT = {
    # the folder is only read when no image inputs are connected
    ("FrozenTuneControlNetZeroTrain", "dataset_folder"):
        lambda: graphs.controlnet_zero_train(use_images=False, dataset_folder="controlnet_zero_disks"),
    # custom_blocks is only read with preset "custom"
    ("FrozenTuneInstantStyleApply", "custom_blocks"): lambda: graphs.instantstyle_apply(preset="custom"),
    ("FrozenTuneInstantStyleApplyEmbeds", "custom_blocks"): lambda: graphs.instantstyle_apply_embeds(preset="custom"),
    ("FrozenTuneInstantStyleApplyFlux", "custom_blocks"): lambda: graphs.instantstyle_apply_flux(preset="custom"),
    ("FrozenTuneInstantStyleApplyEmbedsFlux", "custom_blocks"):
        lambda: graphs.instantstyle_apply_embeds_flux(preset="custom"),
    # the folder is the views only when the image input is empty (both given is refused, naming folder)
    ("FrozenTuneTextualInversionTrain", "folder"): lambda: graphs.textual_inversion_train(use_image=False),
}
# Nodes whose base graph reads a file a session fixture writes first: node -> (fixture, graph builder).
FIXTURE_BASES = {"FrozenTuneUniTuneLoad": ("unitune_file", graphs.unitune_load),
                 "FrozenTuneInstantStyleLoadEmbeds": ("embeds_file", graphs.instantstyle_load_embeds)}
# Node ids in the order they run: the SD1.5 ones first, then the SDXL-family ones (one model switch).
NODE_ORDER = ["FrozenTuneUniTuneFineTune", "FrozenTuneUniTuneSave", "FrozenTuneUniTuneLoad",
              "FrozenTunePromptGuidanceGuider", "FrozenTuneUniTuneEdit", "FrozenTuneControlNetZeroCreate",
              "FrozenTuneControlNetZeroTrain", "FrozenTuneControlNetZeroSave", "FrozenTuneTextualInversionTrain",
              "FrozenTuneEmbeddingWords",
              "FrozenTuneIPAdapterLoader",
              "FrozenTuneInstantStyleApply", "FrozenTuneInstantStyleEncode", "FrozenTuneInstantStyleApplyEmbeds",
              "FrozenTuneInstantStyleCombineEmbeds", "FrozenTuneInstantStyleSaveEmbeds",
              "FrozenTuneInstantStyleLoadEmbeds",
              # Flux.1 dev last (tiny stand-ins under the template's names)
              "FrozenTuneFluxIPAdapterLoader", "FrozenTuneInstantStyleApplyFlux", "FrozenTuneInstantStyleEncodeFlux",
              "FrozenTuneInstantStyleApplyEmbedsFlux"]


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


def combo_cases(info: dict) -> list[tuple[str, str, str, object]]:
    """An unknown value for every choice input: ComfyUI 0.3.75 does not check V3 combos ("COMBO") at POST."""
    return [(name, "COMBO", "unknown", "no_such_choice") for group in ("required", "optional")
            for name, spec in info["input"].get(group, {}).items() if spec[0] == "COMBO"]


def names_input(outcome: hostile.Outcome, name: str, value: object) -> bool:
    """The answer names the input, or quotes the bad value (as "custom block '.' is not a block key")."""
    quoted = isinstance(value, str) and value and repr(value) in outcome.message
    return outcome.names(name) or name.replace("_", " ") in outcome.message or bool(quoted)


def judge(node: str, name: str, kind: str, value: object, outcome: hostile.Outcome) -> str | None:
    """None if the answer is acceptable, else what is wrong with it."""
    if outcome.status == "success":
        if kind == "STRING" and name in TEXT:
            return None
        if (node, name) in CLAMPED:
            return None
        if (node, name) in EMPTY_IS_OFF and value == "":
            return None
        return "succeeded"
    if outcome.status == "interrupted":
        return "was interrupted"
    if not names_input(outcome, name, value):
        return f"{outcome.status} without naming {name}: {outcome.message[:200]}"
    return None


@pytest.fixture(scope="module")
def frozentune_info(hostile_server) -> dict:
    return {k: v for k, v in hostile_server.object_info().items() if k.startswith("FrozenTune")}


def test_fuzz_covers_every_frozentune_node(frozentune_info):
    missing = sorted(set(frozentune_info) - set(NODE_ORDER))
    assert not missing, f"FrozenTune nodes without a fuzz base graph (add one to harness.graphs): {missing}"
    no_base = [n for n in NODE_ORDER if n not in graphs.BASES and n not in FIXTURE_BASES]
    assert not no_base, f"nodes in NODE_ORDER without a base graph (harness.graphs.BASES): {no_base}"


def _base(node: str, name: str, request: pytest.FixtureRequest) -> graphs.Graph:
    """The node's base graph for fuzzing ``name``; a fixture file it reads is made on first use (so only then)."""
    if (node, name) in BASE_FOR_INPUT:
        return BASE_FOR_INPUT[(node, name)]()
    if node in FIXTURE_BASES:
        fixture, build = FIXTURE_BASES[node]
        return build(request.getfixturevalue(fixture).name)
    return graphs.BASES[node]()


def plan(node: str, info: dict) -> list[tuple[str, dict[str, object], list[tuple[str, str]]]]:
    """The prompts to send: (label, {input: value}, [(input, kind)]).

    One case per prompt, except free text: every free-text input of the node gets the same bad string in
    one prompt (they may all succeed, so one run checks them together); if that prompt is not a success its
    inputs are re-run one by one (``run_case``), so a refusal is still pinned to the input it names.
    """
    prompts, text = [], {}
    for name, kind, label, value in cases_for(info):
        if kind == "STRING" and name in TEXT and (node, name) not in BASE_FOR_INPUT:
            text.setdefault(label, []).append((name, value))
        else:
            prompts.append((f"{name}={label}", {name: value}, [(name, kind)]))
    for label, pairs in text.items():
        prompts.append((f"{'+'.join(n for n, _ in pairs)}={label}", dict(pairs), [(n, "STRING") for n, _ in pairs]))
    return prompts


def _verdict(node: str, problems: list[str], prefix: str) -> None:
    """Fail on any bad answer not in KNOWN; a KNOWN case of this test that passed fails too (strict xfail)."""
    known = {where for n, where in KNOWN if n == node and where.endswith(prefix)}
    if not prefix:
        known = {where for where in known if not where.endswith("=unknown")}
    new = [p for p in problems if p.split(": ", 1)[0] not in known]
    assert not new, f"{node}: {len(new)} bad answer(s):\n" + "\n".join(new)
    still = sorted({p.split(": ", 1)[0] for p in problems} & known)
    fixed = sorted(known - set(still))
    assert not fixed, f"{node}: {fixed} now pass: remove them from KNOWN"
    if still:
        pytest.xfail("; ".join(KNOWN[(node, where)] for where in still))


class Checked:
    """Runs fuzz prompts against one server and collects what is wrong with the answers."""

    def __init__(self, srv, node: str, request: pytest.FixtureRequest):
        self.srv, self.node, self.request = srv, node, request
        self.problems: list[str] = []
        self.counts = {"refused": 0, "error": 0, "success": 0, "interrupted": 0}
        self.neighbours = sorted(p.name for p in srv.base.parent.iterdir())

    def run_case(self, where: str, values: dict[str, object], kinds: list[tuple[str, str]]) -> None:
        first = kinds[0][0]
        abs_existed = Path("/abs").exists()
        before = hostile.snapshot(self.srv.base)
        prompt = _base(self.node, first, self.request).prompt(**values)
        outcome = hostile.run(self.srv, prompt, timeout=300)
        after = hostile.snapshot(self.srv.base)
        if len(kinds) > 1 and outcome.status != "success":  # grouped free text: pin it on one input
            for name, kind in kinds:
                self.run_case(f"{name}={where.split('=', 1)[1]}", {name: values[name]}, [(name, kind)])
            return
        self.counts[outcome.status] += 1
        for name, kind in kinds:
            verdict = judge(self.node, name, kind, values[name], outcome)
            if verdict:
                self.problems.append(f"{where}: {verdict}")
        leaked = hostile.leaks(hostile.changes(before, after))
        if leaked:
            self.problems.append(f"{where}: wrote outside the job folders: {leaked[:5]}")
        if not abs_existed and Path("/abs").exists():
            shutil.rmtree("/abs") if Path("/abs").is_dir() else Path("/abs").unlink()
            self.problems.append(f"{where}: created /abs on the host")
        if sorted(p.name for p in self.srv.base.parent.iterdir()) != self.neighbours:
            self.problems.append(f"{where}: wrote beside the base directory")
        assert self.srv.proc.poll() is None, f"the server died at {where}:\n{self.srv.log_tail()}"
        self.srv.get("/system_stats", timeout=10)  # still answers


@pytest.mark.long
@pytest.mark.parametrize("node", NODE_ORDER)
def test_fuzz_node_inputs(request, hostile_server, frozentune_info, node):
    srv = hostile_server
    if node not in frozentune_info:
        pytest.skip(f"{node} is not in this server's /object_info")
    base_ok = hostile.run(srv, _base(node, "", request).prompt())
    assert base_ok.status == "success", f"the base graph of {node} fails: {base_ok.message}"
    checked = Checked(srv, node, request)
    started = time.monotonic()
    for where, values, kinds in plan(node, frozentune_info[node]):
        checked.run_case(where, values, kinds)
    log.warning("fuzz %s: %s in %.1f s", node, checked.counts, time.monotonic() - started)
    _verdict(node, checked.problems, prefix="")


@pytest.mark.long
@pytest.mark.parametrize("node", NODE_ORDER)
def test_fuzz_unknown_choices(request, hostile_server, frozentune_info, node):
    """Every combo input set to a value that is not one of its options: refused, naming the input."""
    srv = hostile_server
    if node not in frozentune_info:
        pytest.skip(f"{node} is not in this server's /object_info")
    checked = Checked(srv, node, request)
    for name, kind, label, value in combo_cases(frozentune_info[node]):
        checked.run_case(f"{name}={label}", {name: value}, [(name, kind)])
    log.warning("fuzz choices %s: %s", node, checked.counts)
    _verdict(node, checked.problems, prefix="=unknown")
