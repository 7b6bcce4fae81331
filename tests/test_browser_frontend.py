"""The pack in ComfyUI's real web frontend (headless Chromium): what a person sees and clicks.

One server and one browser for the module: every example opens from the template browser (Templates >
Custom Nodes > likeness) with no missing node type, no invalid widget value except model-file dropdowns
(those must name a manifest file or a file a trainer example writes), no overlapping nodes, each node in
one group and a note in every group; the face-analysis example runs from the Run button on the bundled
dlib models; the Face Fusion trainer example runs on the tiny test model (swapped in for its checkpoint
loader, as a person swaps a loader), is cancelled from the UI, resumes from its checkpoint when run again
unchanged, and once finished returns its result without training; the adapter it wrote is listed after
the frontend's refresh (R).

Needs ComfyUI (COMFYUI_PATH), Debian's chromium (/usr/bin/chromium) and Python playwright; skipped
otherwise (it never downloads a browser). Screenshots go to $LIKENESS_BROWSER_SHOTS (default: a temp
folder); LIKENESS_WRITE_THUMBNAILS=1 also writes each example's thumbnail, example_workflows/<name>.jpg.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import pytest

import browser_support
from conftest import COMFYUI_PATH, ROOT
from workflow_layout import EXAMPLES, EXAMPLES_DIR, Box, layout_problems

pytestmark = [pytest.mark.host, pytest.mark.browser]

_MISSING = browser_support.missing_requirements(COMFYUI_PATH)
if _MISSING:
    pytest.skip("browser test needs " + "; ".join(_MISSING), allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402  (after the skip: playwright may be missing)

FACE_ANALYSIS = "Face analysis - first run, no downloads"
FUSION_TRAIN = "Face Fusion - train an adapter"
FUSION_APPLY = "Face Fusion - one identity"
TRAINER_TYPES = {"LikenessTrainFaceFusion", "LikenessTrainConsistentID", "LikenessFaceATrainIdentity",
                 "LikenessFaceAAttributeTransfer"}
# The second person of "FaceA-Net - two identities in one scene": its note says to train it with the trainer
# example under this name (the trainer example itself trains the first person, anna).
SECOND_IDENTITY = "ben.safetensors"
RUN_TIMEOUT = 300  # seconds for one queued graph on shared cores
THUMBNAIL_WIDTH = 640

CAPTURE_MISSING_JS = """() => {
  window.__likenessMissing = null;
  app.registerExtension({name: "likeness.test.missing", afterConfigureGraph(missing) {
    window.__likenessMissing = (missing ?? []).map((m) => (typeof m === "string" ? m : m.type));
  }});
}"""

GRAPH_STATE_JS = """() => ({
  missing: window.__likenessMissing,
  errors: app.graph.nodes.filter((n) => n.has_errors).map((n) => n.type),
  scale: app.canvas.ds.scale,
  nodes: app.graph.nodes.map((n) => ({id: n.id, type: n.type, box: [...n.boundingRect],
    widgets: (n.widgets ?? []).map((w) => ({name: w.name, value: w.value,
      values: Array.isArray(w.options?.values) ? w.options.values : null,
      min: w.options?.min ?? null, max: w.options?.max ?? null}))})),
  groups: app.graph.groups.map((g) => ({title: g.title, box: [...g._bounding]})),
})"""


@dataclass
class Frontend:
    server: browser_support.ComfyServer
    page: object
    errors: list[str]
    base: str
    shots: str


def _photo() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def _save(path: str, pixels: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


def _example(name: str) -> dict:
    with open(os.path.join(EXAMPLES_DIR, name + ".json"), encoding="utf-8") as handle:
        return json.load(handle)


def _prepare_inputs(base: str) -> None:
    """Every image an example loads (the astronaut photo), and photos + captions for the Fusion trainer."""
    photo = _photo()
    for example in EXAMPLES:
        for node in _example(example.name)["nodes"]:
            if node["type"] == "LoadImage":
                _save(os.path.join(base, "input", node["widgets_values"][0]), photo)
    _save(os.path.join(base, "input", "generated.png"), photo[:, ::-1])
    faces = os.path.join(base, "input", "likeness_faces")
    for index, pixels in enumerate((photo, photo[:, ::-1])):
        _save(os.path.join(faces, f"face{index}.png"), pixels)
        with open(os.path.join(faces, f"face{index}.txt"), "w", encoding="utf-8") as handle:
            handle.write("a photo of a woman astronaut")


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    from host_support import HOST_NODES_DIR

    base = str(tmp_path_factory.mktemp("browser_base"))
    browser_support.prepare_base(base, ROOT, extra_nodes=(HOST_NODES_DIR,))  # + the tiny test model loader
    _prepare_inputs(base)
    shots = os.environ.get("LIKENESS_BROWSER_SHOTS") or str(tmp_path_factory.mktemp("browser_shots"))
    os.makedirs(shots, exist_ok=True)
    with browser_support.ComfyServer(base, COMFYUI_PATH) as server, sync_playwright() as playwright:
        browser, page, errors = browser_support.open_page(playwright, server.url)
        page.evaluate(CAPTURE_MISSING_JS)
        try:
            yield Frontend(server, page, errors, base, shots)
        finally:
            browser.close()


# --------------------------------------------------------------------------------------------------
# The template browser


def open_template(frontend: Frontend, name: str) -> None:
    """Templates (sidebar) > Custom Nodes > likeness > search the name > click its card."""
    page = frontend.page
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Templates", exact=True).click()
    dialog = page.locator(".p-dialog").filter(has=page.locator("li.p-listbox-option"))
    dialog.locator("li.p-listbox-option", has_text=browser_support.PACK_FOLDER).click()
    dialog.get_by_placeholder(re.compile("search", re.IGNORECASE)).fill(name)
    page.evaluate("() => { window.__likenessMissing = null; }")
    dialog.locator(f"[data-testid='template-workflow-{name}']").click()
    page.wait_for_function("() => window.__likenessMissing !== null", timeout=60_000)
    dialog.wait_for(state="detached", timeout=30_000)
    page.wait_for_timeout(500)  # a missing-nodes dialog would be up by now


def model_file_values(states: dict[str, dict]) -> set[str]:
    """Values a model-file dropdown may hold without the file: the manifest's files, insightface packs and
    M3Face's diffusers folders (listed file by file), and the files the trainer examples write (their ``name``
    widget)."""
    with open(os.path.join(ROOT, "models_manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)["models"]
    allowed = {os.path.basename(e["filename"]) for e in manifest} | {SECOND_IDENTITY}
    allowed |= {os.path.basename(e["folder"]) for e in manifest
                if e["folder"].startswith(("insightface/", "likeness/evaluation/"))}  # model folders, not files
    allowed |= {e["folder"].split("/")[2] for e in manifest if e["folder"].startswith("likeness/m3face/")}
    for state in states.values():
        for node in state["nodes"]:
            if node["type"] in TRAINER_TYPES:
                allowed |= {w["value"] + ".safetensors" for w in node["widgets"] if w["name"] == "name"}
    return allowed


def widget_problems(nodes: list[dict], allowed_files: set[str]) -> list[str]:
    problems = []
    for node in nodes:
        names = [w["name"] for w in node["widgets"]]
        if node["type"] in TRAINER_TYPES and "control_after_generate" in names:
            problems.append(f"#{node['id']} {node['type']}: the trainer's seed got a randomize control")
        for widget in node["widgets"]:
            label, value = f"#{node['id']} {node['type']}.{widget['name']} = {widget['value']!r}", widget["value"]
            if widget["name"] == "control_after_generate" and value != "fixed":
                problems.append(f"{label}: seeds must be fixed")
            elif widget["values"] is not None and value not in widget["values"]:
                if str(value).rsplit("/", 1)[-1] not in allowed_files:
                    problems.append(f"{label}: not one of {widget['values'][:8]}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                low, high = widget["min"], widget["max"]
                if (low is not None and value < low) or (high is not None and value > high):
                    problems.append(f"{label}: outside [{low}, {high}]")
    return problems


def graph_problems(state: dict, example: dict) -> list[str]:
    problems = []
    if state["missing"] or state["errors"]:
        problems.append(f"missing node types {state['missing']} {state['errors']}")
    if state["scale"] != 1:
        problems.append(f"opens at {state['scale']:.0%} zoom")
    if len(state["nodes"]) != len(example["nodes"]):
        problems.append(f"{len(state['nodes'])} nodes on the canvas, {len(example['nodes'])} in the file")
    nodes = [Box(f"#{n['id']} {n['type']}", *n["box"]) for n in state["nodes"]]
    groups = [Box(g["title"], *g["box"]) for g in state["groups"]]
    problems += layout_problems(nodes, groups)
    notes = [box for box, n in zip(nodes, state["nodes"], strict=True) if n["type"] == "Note"]
    problems += [f"group {g.label} has no note" for g in groups if not any(g.contains(n) for n in notes)]
    return problems


def screenshot(frontend: Frontend, name: str) -> str:
    """The canvas as it is (an example as it opens: 100 % zoom on its first stages); with
    LIKENESS_WRITE_THUMBNAILS=1 also the example's thumbnail for the template browser."""
    path = os.path.join(frontend.shots, name + ".png")
    frontend.page.locator("#graph-canvas").screenshot(path=path)
    if os.environ.get("LIKENESS_WRITE_THUMBNAILS") == "1" and any(e.name == name for e in EXAMPLES):
        from PIL import Image

        with Image.open(path) as shot:
            image = shot.convert("RGB")
        height = round(image.height * THUMBNAIL_WIDTH / image.width)
        image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(
            os.path.join(EXAMPLES_DIR, name + ".jpg"), quality=70, optimize=True)
    return path


def test_every_example_opens_from_the_template_browser(frontend):
    listed = browser_support.get_json(frontend.server.url + "/workflow_templates")[browser_support.PACK_FOLDER]
    assert sorted(listed) == sorted(e.name for e in EXAMPLES)
    states, problems = {}, {}
    for example in EXAMPLES:
        open_template(frontend, example.name)
        states[example.name] = frontend.page.evaluate(GRAPH_STATE_JS)
        problems[example.name] = graph_problems(states[example.name], _example(example.name))
        if frontend.page.locator(".p-dialog", has_text="Some Nodes Are Missing").count():
            problems[example.name].append("the missing-nodes dialog opened")
        screenshot(frontend, example.name)
    allowed = model_file_values(states)
    for name, state in states.items():
        problems[name] += widget_problems(state["nodes"], allowed)
    problems = {name: found for name, found in problems.items() if found}
    assert not problems, json.dumps(problems, indent=1)
    assert not frontend.errors, frontend.errors  # e.g. a thumbnail the browser asked for and did not get


# --------------------------------------------------------------------------------------------------
# Queueing from the page


def history(frontend: Frontend) -> dict:
    return browser_support.get_json(frontend.server.url + "/history")


def click_run(frontend: Frontend) -> str:
    """Press Run; return the id of the prompt it queued."""
    before = set(history(frontend)) | set(_queue_ids(frontend))
    frontend.page.get_by_role("button", name="Run", exact=True).click()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = (set(history(frontend)) | set(_queue_ids(frontend))) - before
        if new:
            (prompt_id,) = new
            return prompt_id
        time.sleep(0.2)
    raise AssertionError("Run queued nothing: " + "; ".join(frontend.errors[-3:]))


def _queue_ids(frontend: Frontend) -> list[str]:
    queue = browser_support.get_json(frontend.server.url + "/queue")
    return [item[1] for item in queue["queue_running"] + queue["queue_pending"]]


def wait_done(frontend: Frontend, prompt_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        entry = history(frontend).get(prompt_id)
        if entry and entry["status"].get("completed") is not None and not _queue_ids(frontend):
            return entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT} s:\n{frontend.server.log()[-3000:]}")


def status_messages(entry: dict, kind: str) -> list[dict]:
    return [data for name, data in entry["status"].get("messages", []) if name == kind]


def test_face_analysis_example_runs_from_the_run_button(frontend):
    open_template(frontend, FACE_ANALYSIS)
    entry = wait_done(frontend, click_run(frontend))
    assert entry["status"]["status_str"] == "success", entry["status"]
    outputs = entry["outputs"]
    for node_id in ("4", "6", "12", "33", "34", "36"):  # the six previews
        assert outputs[node_id]["images"], node_id
    assert "PASS" in outputs["11"]["text"][0]
    assert outputs["9"]["text"][0].endswith("reference_identity.safetensors")
    frontend.page.wait_for_timeout(500)
    screenshot(frontend, "run - " + FACE_ANALYSIS)


TINY_TRAINING = {  # node id -> widget values a person would type for a quick trial run
    "3": {"steps": 10, "checkpoint_every": 2, "resolution": 64, "grad_accumulation": 1},
    "8": {"reference_size": 64},
    "11": {"width": 64, "height": 64},
    "12": {"steps": 2},
}

# As a person swaps a loader: the tiny test model takes the checkpoint loader's place and its links.
SWAP_IN_TINY_MODEL_JS = """() => {
  const graph = app.graph;
  const old = graph.nodes.find((n) => n.type === "CheckpointLoaderSimple");
  const tiny = LiteGraph.createNode("LikenessTestTinySD15Loader");
  graph.add(tiny);
  tiny.pos = [old.pos[0], old.pos[1]];
  for (const widget of tiny.widgets) if (widget.name === "control_after_generate") widget.value = "fixed";
  for (const [slot, output] of old.outputs.entries()) {
    for (const linkId of [...(output.links ?? [])]) {
      const link = graph.links.get ? graph.links.get(linkId) : graph.links[linkId];
      tiny.connect(slot, graph.getNodeById(link.target_id), link.target_slot);
    }
  }
  graph.remove(old);
}"""

SET_WIDGETS_JS = """(values) => {
  for (const [id, widgets] of Object.entries(values)) {
    const node = app.graph.getNodeById(Number(id));
    for (const [name, value] of Object.entries(widgets)) node.widgets.find((w) => w.name === name).value = value;
  }
  app.graph.setDirtyCanvas(true, true);
}"""


def _wait_for_log(frontend: Frontend, pattern: str, start: int, prompt_id: str | None = None,
                  timeout: float = RUN_TIMEOUT) -> re.Match:
    """The first match of ``pattern`` in the server log after ``start``; fails early when ``prompt_id``
    finished without it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, frontend.server.log()[start:])
        if match:
            return match
        if prompt_id and history(frontend).get(prompt_id, {}).get("status", {}).get("completed") is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no '{pattern}' in the server log:\n{frontend.server.log()[start:][-3000:]}")


def cancel_from_the_ui(frontend: Frontend, prompt_id: str, log_start: int) -> None:
    """Press Cancel (the queue button's "Cancel current run") until the server says it interrupts the run: a
    click while the frontend re-renders the button can get lost, and a person would press again."""
    for _ in range(3):
        frontend.page.get_by_role("button", name="Cancel current run").click()
        try:
            _wait_for_log(frontend, "Interrupting prompt " + prompt_id, log_start, prompt_id, timeout=10)
            return
        except AssertionError:
            continue
    raise AssertionError("Cancel did not reach the server:\n" + frontend.server.log()[log_start:][-3000:])


def _trainer_seed(entry: dict) -> int:
    return entry["prompt"][2]["3"]["inputs"]["seed"]


def test_trainer_cancelled_resumes_and_a_finished_run_is_not_retrained(frontend):
    open_template(frontend, FUSION_TRAIN)
    frontend.page.evaluate(SWAP_IN_TINY_MODEL_JS)
    frontend.page.evaluate(SET_WIDGETS_JS, TINY_TRAINING)
    log_start = len(frontend.server.log())
    first = click_run(frontend)
    _wait_for_log(frontend, r"checkpoint at step 2 written", log_start, first)
    cancel_from_the_ui(frontend, first, log_start)
    cancelled = wait_done(frontend, first)
    assert status_messages(cancelled, "execution_interrupted"), cancelled["status"]
    saved = int(_wait_for_log(frontend, r"cancelled at step \d+ of 10; last checkpoint: step (\d+)", log_start)[1])
    assert 2 <= saved < 10

    resumed_at = len(frontend.server.log())
    second = wait_done(frontend, click_run(frontend))  # Run again, nothing changed
    assert second["status"]["status_str"] == "success", second["status"]
    assert _wait_for_log(frontend, r"resumed from \S+ at step (\d+) of 10", resumed_at, timeout=5)[1] == str(saved)
    assert second["outputs"]["4"]["images"] and second["outputs"]["14"]["images"]
    adapter = os.path.join(frontend.base, "models", "likeness", "fusion", "my_face.safetensors")
    assert os.path.isfile(adapter)

    again_at = len(frontend.server.log())
    third = wait_done(frontend, click_run(frontend))  # Run again after it finished
    assert third["status"]["status_str"] == "success", third["status"]
    cached = [n for m in status_messages(third, "execution_cached") for n in m["nodes"]]
    assert "3" in cached, third["status"]
    assert not re.search(r"checkpoint at step|resumed from", frontend.server.log()[again_at:])
    assert _trainer_seed(cancelled) == _trainer_seed(second) == _trainer_seed(third)
    screenshot(frontend, "run - " + FUSION_TRAIN)


def test_a_trained_adapter_is_listed_after_refresh(frontend):
    """The apply example names the trainer's file; the open page lists it after R, without a restart."""
    if not os.path.isfile(os.path.join(frontend.base, "models", "likeness", "fusion", "my_face.safetensors")):
        pytest.skip("needs the adapter of the trainer test")
    open_template(frontend, FUSION_APPLY)
    options = """() => app.graph.nodes.find((n) => n.type === "LikenessFusionAdapterLoader").widgets[0].options.values"""
    assert "my_face.safetensors" not in frontend.page.evaluate(options)  # node definitions are from page load
    frontend.page.locator("#graph-canvas").click(position={"x": 5, "y": 500})
    frontend.page.keyboard.press("r")
    frontend.page.wait_for_function(f"() => ({options})().includes('my_face.safetensors')", timeout=30_000)
