"""Headless runner: ``python path/to/likeness run WORKFLOW.json [--set NODE.INPUT=VALUE ...] [--out DIR]``.

Why: a workflow can be run (in CI, on a server without a browser, in a script) exactly as ComfyUI
would run it, and a failure is reported as one paragraph that names the node and, for a missing
model file, the command that downloads it.

Interface for ``cli/main.py`` (stable):

    def add_run_arguments(parser: argparse.ArgumentParser) -> None
        Adds: WORKFLOW (positional), --set NODE.INPUT=VALUE (repeatable; VALUE parsed as JSON when
        possible, else kept as a string), --out DIR, --comfyui PATH, --extra-nodes DIR (repeatable),
        plus --base-directory DIR, --device {auto,cpu,gpu}, --verbose.

    def run_from_args(args: argparse.Namespace) -> int
        Runs the workflow; returns the exit code: 0 ok, 1 execution error, 2 usage/validation error.

The workflow runs in this process through ComfyUI's own executor with the core nodes, ``comfy_extras``,
every custom node in ComfyUI's ``custom_nodes`` (as the server would load them), this pack and any
``--extra-nodes`` folders; everything that touches ComfyUI is in ``host/headless.py``. UI-format
workflows (the JSON the editor saves) are converted first (``cli/ui_workflow.py``).

The host test fixtures (``tests/host_support.py``) run prompts through :func:`execute_prompt`, so
tests and the command line run graphs the same way and get the same messages.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable

from ..host import headless
from ..host.headless import HeadlessError, HostSetupError, PromptExecutionError, PromptValidationError
from ..host.paths import local_user_paths
from . import manifest as mf
from .console import say
from .main import pack_command
from .ui_workflow import WorkflowFormatError, is_api_format, is_ui_format, node_id_key, ui_to_api

logger = logging.getLogger("likeness")

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST_PATH = mf.DEFAULT_MANIFEST

EXIT_OK, EXIT_EXECUTION, EXIT_USAGE = 0, 1, 2
COMFYUI_SEARCH_DEPTH = 6  # folders walked up from the pack (custom_nodes/<pack> may sit in a nested checkout)
STEP_LINE_SECONDS = 2.0  # at most one sampler step line this often

# Widget input name -> folder_paths folder, to say where a missing model file was looked for.
MODEL_INPUT_FOLDERS = {
    "ckpt_name": "checkpoints", "vae_name": "vae", "lora_name": "loras", "control_net_name": "controlnet",
    "clip_name": "clip_vision", "unet_name": "diffusion_models", "upscale_model": "upscale_models",
    "style_model_name": "style_models", "photomaker_model_name": "photomaker",
}
MODEL_FILE_EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".sft", ".gguf", ".json", ".pt2"}


# --------------------------------------------------------------------------------------------------
# Errors (each maps to an exit code; the message is one user-facing paragraph)


class RunnerError(Exception):
    exit_code = EXIT_EXECUTION


class UsageError(RunnerError):
    """Bad command line, unreadable workflow, ComfyUI not found."""
    exit_code = EXIT_USAGE


# Problems of the input (workflow, paths, ComfyUI set-up) rather than of a node that ran.
USAGE_PROBLEMS = (WorkflowFormatError, HostSetupError, PromptValidationError)
REPORTED_ERRORS = (RunnerError, WorkflowFormatError, HeadlessError)


def exit_code_for(exc: Exception) -> int:
    if isinstance(exc, RunnerError):
        return exc.exit_code
    return EXIT_USAGE if isinstance(exc, USAGE_PROBLEMS) else EXIT_EXECUTION


# --------------------------------------------------------------------------------------------------
# Command line


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``run`` sub-command's arguments to ``parser``."""
    parser.add_argument("workflow", metavar="WORKFLOW",
                        help="workflow JSON: API format (Export (API)) or the UI format the editor saves")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override a node input; NODE is a node id, title or unique class name; VALUE is "
                             "parsed as JSON when possible, else taken as text (repeatable)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where images and other outputs are written (default: ./output)")
    add_host_arguments(parser)


def add_host_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which ComfyUI runs the workflows and how (shared with ``eval``)."""
    parser.add_argument("--comfyui", default=None, metavar="PATH",
                        help="ComfyUI folder (default: $COMFYUI_PATH, else the ComfyUI folder this pack is in)")
    parser.add_argument("--extra-nodes", dest="extra_nodes", action="append", default=[], metavar="DIR",
                        help="also load this custom-node package, or every package in this folder (repeatable)")
    parser.add_argument("--base-directory", dest="base_directory", default=None, metavar="DIR",
                        help="ComfyUI base directory (models/, input/, custom_nodes/), as ComfyUI's own option")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto (default): the GPU when torch sees one, else the CPU; cpu: --cpu "
                             "--use-pytorch-cross-attention; gpu: let ComfyUI pick its GPU")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's log and full tracebacks")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the workflow described by ``args``; print progress and a summary; return the exit code."""
    verbose = getattr(args, "verbose", False)
    setup_logging(verbose)
    started = time.perf_counter()
    try:
        written, out_dir = _run(args)
    except REPORTED_ERRORS as exc:
        _print(f"error: {exc}", stream=sys.stderr)
        if verbose and isinstance(exc, PromptExecutionError):
            _print("".join(exc.details.get("traceback", [])), stream=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        _print("interrupted", stream=sys.stderr)
        return EXIT_EXECUTION
    except Exception as exc:  # a bug (here or in ComfyUI): say so in one line, traceback on request
        if verbose:
            raise
        _print(f"error: unexpected {type(exc).__name__}: {exc} (run with --verbose for the traceback)",
               stream=sys.stderr)
        return EXIT_EXECUTION
    for path in written:
        _print(f"wrote {path}")
    _print(f"done in {time.perf_counter() - started:.1f} s: {len(written)} file(s) in {out_dir}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> tuple[list[str], str]:
    """Every step of a run; returns the files written and the output folder."""
    workflow = read_workflow(args.workflow)
    overrides = [parse_override(text) for text in args.overrides]
    out_dir = os.path.abspath(args.out or "output")
    comfy_path = find_comfyui(args.comfyui)
    _print(f"ComfyUI: {comfy_path}")
    headless.prepare_host(comfy_path, device=args.device, base_directory=args.base_directory,
                          output_directory=out_dir)
    load_nodes(args.extra_nodes)
    prompt = to_api_prompt(workflow)
    apply_overrides(prompt, overrides)
    with local_user_paths():  # the command line runs as the local user: any path it names is accepted
        outputs = execute_prompt(prompt, on_event=ProgressPrinter(prompt))
    written = collect_outputs(outputs, out_dir)
    print_text_outputs(prompt, outputs)
    return written, out_dir


def load_nodes(extra_nodes: list[str]) -> None:
    """ComfyUI's nodes, custom nodes, this pack and ``extra_nodes``, as the server loads them (once per process)."""
    _print("loading nodes (core, comfy_extras, custom nodes, this pack) ...")
    report = headless.load_host_nodes(PACK_DIR, extra_nodes=extra_nodes, custom_nodes=True)
    for failed in report.failed:
        _print(f"warning: custom node package {failed} failed to import (see the log with --verbose)")
    if report.pack_failed:
        raise RunnerError(f"This pack ({PACK_DIR}) failed to import into ComfyUI. Run again with --verbose "
                          f"to see the error.")


def _print(text: str, stream=None) -> None:
    say(text, file=stream or sys.stdout, flush=True)


def setup_logging(verbose: bool) -> None:
    """ComfyUI logs through the root logger; keep its chatter out of the runner's output unless asked."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    # Not even ERROR: ComfyUI logs validation failures and node exceptions (with tracebacks) at ERROR,
    # and the runner prints its own one-paragraph message for those.
    root.setLevel(logging.INFO if verbose else logging.CRITICAL)


# --------------------------------------------------------------------------------------------------
# Finding ComfyUI


def is_comfyui_dir(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, p)) for p in ("main.py", "folder_paths.py", "comfy", "nodes.py"))


def _enclosing_comfyui(start: str) -> str | None:
    path = start
    for _ in range(COMFYUI_SEARCH_DEPTH):
        if is_comfyui_dir(path):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None


def find_comfyui(explicit: str | None = None) -> str:
    """ComfyUI folder from ``--comfyui``, ``$COMFYUI_PATH``, or the folder this pack was cloned into."""
    for source, path in (("--comfyui", explicit), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH"))):
        if path:
            path = os.path.abspath(os.path.expanduser(path))
            if not is_comfyui_dir(path):
                raise UsageError(f"{source} points to '{path}', which is not a ComfyUI folder (no main.py, "
                                 f"folder_paths.py, nodes.py and comfy/ there).")
            return path
    # The pack normally lives in ComfyUI/custom_nodes/<pack>; it may be a symlink, so try both spellings.
    for start in (PACK_DIR, os.path.realpath(PACK_DIR), os.getcwd()):
        found = _enclosing_comfyui(start)
        if found:
            return found
    raise UsageError("ComfyUI was not found: this pack is not inside a ComfyUI folder. Pass --comfyui "
                     "PATH or set COMFYUI_PATH to your ComfyUI checkout.")


# --------------------------------------------------------------------------------------------------
# Workflow files and overrides


def read_workflow(path: str) -> dict:
    data = mf.read_json(path, UsageError, "workflow file")
    if not isinstance(data, dict):
        raise UsageError(f"workflow file '{path}' does not hold a JSON object.")
    return data


def to_api_prompt(workflow: dict, node_classes: dict | None = None) -> dict:
    """An API-format prompt from either format (a ``{"prompt": ...}`` wrapper is accepted too).

    ``node_classes`` (type name -> class) is needed for the UI format only; by default ComfyUI's.
    """
    if isinstance(workflow.get("prompt"), dict) and is_api_format(workflow["prompt"]):
        workflow = workflow["prompt"]
    if is_api_format(workflow):
        return json.loads(json.dumps(workflow))
    if is_ui_format(workflow):
        return ui_to_api(workflow, headless.node_classes() if node_classes is None else node_classes)
    raise UsageError("the workflow is neither API format (node id -> {class_type, inputs}) nor the UI format "
                     "(nodes and links).")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``NODE.INPUT=VALUE`` -> (node, input, value); VALUE is JSON when it parses, else the raw text."""
    key, sep, raw = text.partition("=")
    node, dot, name = key.strip().rpartition(".")
    if not sep or not dot or not node or not name:
        raise UsageError(f"--set '{text}' is not NODE.INPUT=VALUE (e.g. --set 3.seed=42 or --set KSampler.steps=4).")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return node, name, value


def find_node(prompt: dict, ref: str) -> str:
    """Node id for ``ref``: an id, a title (``_meta.title``) or a class type used by exactly one node."""
    if ref in prompt:
        return ref
    by_title = [nid for nid, n in prompt.items() if n.get("_meta", {}).get("title") == ref]
    by_class = [nid for nid, n in prompt.items() if n.get("class_type") == ref]
    for matches in (by_title, by_class):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UsageError(f"--set: '{ref}' matches several nodes ({', '.join(sorted(matches))}); use the node id.")
    raise UsageError(f"--set: no node '{ref}' in the workflow (ids: {', '.join(sorted(prompt, key=node_id_key))}).")


def apply_overrides(prompt: dict, overrides: list[tuple[str, str, Any]]) -> None:
    """Apply ``--set`` values; an unknown input name is a usage error listing the known ones."""
    for ref, name, value in overrides:
        node_id = find_node(prompt, ref)
        node = prompt[node_id]
        known = set(node.get("inputs", {})) | headless.declared_inputs(node.get("class_type"))
        if name not in known:
            raise UsageError(f"--set {ref}.{name}: node #{node_id} ({node.get('class_type')}) has no input "
                             f"'{name}' (inputs: {', '.join(sorted(known)) or 'none'}).")
        node.setdefault("inputs", {})[name] = value


# --------------------------------------------------------------------------------------------------
# Executing and reporting


def execute_prompt(prompt: dict, on_event: Callable[[str, Any], None] | None = None, executor=None) -> dict:
    """Run ``prompt`` through ComfyUI's executor (:func:`host.headless.execute_prompt`, ``executor`` to reuse
    one's cache); its errors come back as the same types with a user-facing message: the failing node, and how
    to get a missing model."""
    try:
        return headless.execute_prompt(prompt, on_event=on_event, executor=executor)
    except PromptValidationError as exc:
        message = describe_validation_error(prompt, exc.error, exc.node_errors)
        raise PromptValidationError(message, exc.error, exc.node_errors) from exc
    except PromptExecutionError as exc:
        raise PromptExecutionError(describe_execution_error(prompt, exc.details), exc.details) from exc


def collect_outputs(outputs: dict, out_dir: str) -> list[str]:
    """Files named in the ui outputs (SaveImage, PreviewImage, ...), copied into ``out_dir`` if elsewhere."""
    os.makedirs(out_dir, exist_ok=True)
    inside = os.path.realpath(out_dir) + os.sep
    written = []
    for source in headless.output_files(outputs, fallback_dir=out_dir):
        if os.path.realpath(source).startswith(inside):  # SaveImage wrote it here
            written.append(source)
            continue
        target = os.path.join(out_dir, os.path.basename(source))
        shutil.copyfile(source, target)
        written.append(target)
    return written


def print_text_outputs(prompt: dict, outputs: dict, stream=None) -> None:
    """Text a node shows in the UI (``ui["text"]``, e.g. a similarity report), printed under its node."""
    for node_id, ui in sorted(outputs.items(), key=lambda kv: node_id_key(kv[0])):
        texts = [t for t in ui.get("text", []) if isinstance(t, str)] if isinstance(ui, dict) else []
        for text in texts:
            _print(f"#{node_id} {_node_label(prompt, node_id)}:", stream)
            for line in text.splitlines():
                _print(f"    {line}", stream)


class ProgressPrinter:
    """One line per executed node, plus sampler step lines, printed from the executor's events."""

    def __init__(self, prompt: dict, stream=None):
        self.prompt = prompt
        self.stream = stream
        self.count = 0
        self.total = len(prompt)
        self.cached: set = set()
        self.last_step_line = 0.0

    def __call__(self, event: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if event == "execution_cached":
            self.cached = set(data.get("nodes", []))
        elif event == "executing" and data.get("node") is not None:
            self.count += 1
            node_id = str(data["node"])
            _print(f"[{self.count}/{self.total}] #{node_id} {_node_label(self.prompt, node_id)}", self.stream)
        elif event == "progress":
            value, total = data.get("value", 0), data.get("max", 0)
            now = time.monotonic()
            if value >= total or now - self.last_step_line > STEP_LINE_SECONDS:
                self.last_step_line = now
                _print(f"      {value}/{total}", self.stream)


def _node_label(prompt: dict, node_id: str) -> str:
    node = prompt.get(node_id, {})
    title = node.get("_meta", {}).get("title")
    class_type = node.get("class_type", "?")
    return f"{class_type} ({title})" if title and title != class_type else class_type


# --------------------------------------------------------------------------------------------------
# Error messages


def manifest_entries() -> list[mf.ModelEntry]:
    """The model manifest's entries; empty when it is missing or invalid (the runner must still run)."""
    try:
        return mf.load_manifest(MANIFEST_PATH)
    except mf.ManifestError as exc:
        logger.debug("no download hints: %s", exc)
        return []


def _fetch_command(entry: mf.ModelEntry) -> str:
    return f" Get it with: {pack_command()} models fetch {entry.id} (it goes to models/{entry.folder}/)."


def fetch_hint(filename: str) -> str:
    """The command that downloads ``filename`` (empty when the manifest does not list it)."""
    entry = mf.entry_for_file(manifest_entries(), filename)
    return _fetch_command(entry) if entry else ""


def _search_paths(folder: str) -> str:
    return ", ".join(headless.model_search_paths(folder)) or f"models/{folder}"


def _looks_like_file(value: Any) -> bool:
    return isinstance(value, str) and os.path.splitext(value)[1].lower() in MODEL_FILE_EXTENSIONS


def _describe_reason(label: str, reason: dict) -> str:
    """One sentence for one of ComfyUI's per-node validation errors."""
    extra = reason.get("extra_info", {}) or {}
    name = extra.get("input_name", "")
    value = extra.get("received_value")
    if reason.get("type") == "value_not_in_list" and _looks_like_file(value):
        folder = MODEL_INPUT_FOLDERS.get(name)
        where = f" (looked in: {_search_paths(folder)})" if folder else ""
        hint = fetch_hint(value) or " Put the file into the matching ComfyUI models folder."
        return f"{label}: the model file '{value}' for input '{name}' was not found{where}.{hint}"
    return f"{label}: {reason.get('message', 'invalid')}: {reason.get('details', '')}".rstrip(": ")


def describe_validation_error(prompt: dict, error: dict | None, node_errors: dict | None) -> str:
    """One paragraph: which node and input is wrong and what to do (missing model files first)."""
    error = error or {}
    parts = []
    for node_id, info in sorted((node_errors or {}).items()):
        label = f"node #{node_id} ({_node_label(prompt, str(node_id))})"
        parts += [_describe_reason(label, reason) for reason in info.get("errors", [])]
    if not parts:
        parts.append(f"{error.get('message', 'the prompt is invalid')}: {error.get('details', '')}".rstrip(": "))
    return "The workflow did not pass ComfyUI's validation. " + " ".join(
        p if p.endswith(".") else p + "." for p in parts)


def describe_execution_error(prompt: dict, details: dict) -> str:
    """One paragraph naming the failing node, the error and, for a missing model file, how to get it."""
    node_id = str(details.get("node_id", "?"))
    message = str(details.get("exception_message", "the prompt failed")).strip()
    kind = str(details.get("exception_type", "")).rsplit(".", 1)[-1]
    text = f"Node #{node_id} ({_node_label(prompt, node_id)}) failed: {kind + ': ' if kind else ''}{message}"
    entry = next((e for e in manifest_entries() if e.filename in message), None)
    if entry is not None:
        text += _fetch_command(entry)
    return text
