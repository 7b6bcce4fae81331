"""Headless runner: ``python path/to/likeness run WORKFLOW.json [--set NODE.INPUT=VALUE ...] [--out DIR]``.

Interface for ``cli/main.py`` (stable):

    def add_run_arguments(parser: argparse.ArgumentParser) -> None
        Adds: WORKFLOW (positional), --set NODE.INPUT=VALUE (repeatable; VALUE parsed as JSON when
        possible, else kept as a string), --out DIR, --comfyui PATH, --extra-nodes DIR (repeatable),
        plus --base-directory DIR, --device {cpu,auto}, --verbose.

    def run_from_args(args: argparse.Namespace) -> int
        Runs the workflow; returns the exit code: 0 ok, 1 execution error, 2 usage/validation error.

The workflow runs in this process through ComfyUI's own executor (``execution.PromptExecutor``) with
the core nodes, ``comfy_extras``, every custom node in ComfyUI's ``custom_nodes`` (as the server would
load them), this pack and any ``--extra-nodes`` folders. UI-format workflows (the JSON the editor
saves) are converted to the API format first (:func:`ui_to_api`).

The host test fixtures (``tests/host_support.py``) reuse :func:`prepare_host`, :func:`load_host_nodes`
and :func:`execute_prompt`, so tests and the command line run graphs the same way.

Nothing here imports ComfyUI at module level: ``--help`` and argument errors stay fast.
"""
from __future__ import annotations

from .console import say

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ..host.paths import local_user_paths

logger = logging.getLogger("likeness")

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST_PATH = os.path.join(PACK_DIR, "models_manifest.json")

EXIT_OK, EXIT_EXECUTION, EXIT_USAGE = 0, 1, 2

# Front-end-only node types: they never reach the executor.
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE_TYPES = {"Reroute"}
PRIMITIVE_TYPES = {"PrimitiveNode"}
SET_GET_TYPES = {"SetNode", "GetNode"}  # KJNodes' virtual "Set/Get" wires
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SEED_INPUT_NAMES = {"seed", "noise_seed"}
MODE_MUTED, MODE_BYPASSED = 2, 4

# Widget input name -> folder_paths folder, to say where a missing model file was looked for.
MODEL_INPUT_FOLDERS = {
    "ckpt_name": "checkpoints", "vae_name": "vae", "lora_name": "loras", "control_net_name": "controlnet",
    "clip_name": "clip_vision", "unet_name": "diffusion_models", "upscale_model": "upscale_models",
    "style_model_name": "style_models", "photomaker_model_name": "photomaker",
}


# --------------------------------------------------------------------------------------------------
# Errors (each carries its exit code; the message is one user-facing paragraph)


class RunnerError(Exception):
    exit_code = EXIT_EXECUTION


class UsageError(RunnerError):
    """Bad command line, unreadable workflow, ComfyUI not found."""
    exit_code = EXIT_USAGE


class PromptValidationError(RunnerError):
    """ComfyUI rejected the prompt; ``node_errors`` is ComfyUI's per-node error dict."""
    exit_code = EXIT_USAGE

    def __init__(self, message: str, error: dict | None = None, node_errors: dict | None = None):
        super().__init__(message)
        self.error = error or {}
        self.node_errors = node_errors or {}


class PromptExecutionError(RunnerError):
    """A node raised while the prompt ran; ``details`` is ComfyUI's ``execution_error`` message."""
    exit_code = EXIT_EXECUTION

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


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
    _setup_logging(getattr(args, "verbose", False))
    started = time.perf_counter()
    try:
        workflow = read_workflow(args.workflow)
        overrides = [parse_override(text) for text in args.overrides]
        out_dir = os.path.abspath(args.out or "output")
        comfy_path = find_comfyui(args.comfyui)
        say(f"ComfyUI: {comfy_path}", flush=True)
        prepare_host(comfy_path, device=args.device, base_directory=args.base_directory, output_directory=out_dir)
        _print("loading nodes (core, comfy_extras, custom nodes, this pack) ...")
        report = load_host_nodes(PACK_DIR, extra_nodes=args.extra_nodes, custom_nodes=True)
        for failed in report.failed:
            _print(f"warning: custom node package {failed} failed to import (see the log with --verbose)")
        if report.pack_failed:
            raise RunnerError(f"This pack ({PACK_DIR}) failed to import into ComfyUI. Run again with --verbose "
                              f"to see the error.")
        prompt = to_api_prompt(workflow)
        apply_overrides(prompt, overrides)
        printer = ProgressPrinter(prompt)
        with local_user_paths():  # the command line runs as the local user: any path it names is accepted
            outputs = execute_prompt(prompt, on_event=printer)
        written = collect_outputs(outputs, out_dir)
        print_text_outputs(prompt, outputs)
    except RunnerError as exc:
        _print(f"error: {exc}", stream=sys.stderr)
        if getattr(args, "verbose", False) and isinstance(exc, PromptExecutionError):
            _print("".join(exc.details.get("traceback", [])), stream=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _print("interrupted", stream=sys.stderr)
        return EXIT_EXECUTION
    except Exception as exc:  # a bug (here or in ComfyUI): say so in one line, traceback on request
        if getattr(args, "verbose", False):
            raise
        _print(f"error: unexpected {type(exc).__name__}: {exc} (run with --verbose for the traceback)",
               stream=sys.stderr)
        return EXIT_EXECUTION
    for path in written:
        _print(f"wrote {path}")
    _print(f"done in {time.perf_counter() - started:.1f} s: {len(written)} file(s) in {out_dir}")
    return EXIT_OK


def _print(text: str, stream=None) -> None:
    say(text, file=stream or sys.stdout, flush=True)


def _setup_logging(verbose: bool) -> None:
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
# Finding and preparing ComfyUI


def is_comfyui_dir(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, p)) for p in ("main.py", "folder_paths.py", "comfy", "nodes.py"))


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
    starts = [PACK_DIR, os.path.realpath(PACK_DIR), os.getcwd()]
    for start in starts:
        path = start
        for _ in range(6):
            if is_comfyui_dir(path):
                return path
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    raise UsageError("ComfyUI was not found: this pack is not inside a ComfyUI folder. Pass --comfyui "
                     "PATH or set COMFYUI_PATH to your ComfyUI checkout.")


def configure_comfy_args(device: str = "cpu", base_directory: str | None = None) -> None:
    """Set ComfyUI's command-line flags before ``comfy.model_management`` reads them at import.

    ``device="cpu"`` is ``--cpu --use-pytorch-cross-attention`` (PyTorch SDPA is 2-3x faster than the
    default sub-quadratic attention on CPU and the attention backend is picked at import time).
    """
    from comfy.cli_args import args

    if device == "auto":
        import torch
        has_gpu = torch.cuda.is_available() or (getattr(torch.backends, "mps", None) is not None
                                                and torch.backends.mps.is_available())
        device = "gpu" if has_gpu else "cpu"
    if "comfy.model_management" in sys.modules and device == "cpu" and not args.cpu:
        logger.warning("comfy.model_management was imported before the runner set --cpu; the device stays as it is")
    if device == "cpu":
        args.cpu = True
        args.use_pytorch_cross_attention = True
    args.disable_auto_launch = True
    if base_directory:
        if "folder_paths" in sys.modules:
            raise RuntimeError("set the base directory before folder_paths is imported")
        args.base_directory = os.path.abspath(base_directory)


def prepare_host(comfy_path: str, device: str = "cpu", base_directory: str | None = None,
                 output_directory: str | None = None, temp_directory: str | None = None) -> None:
    """Make ComfyUI importable and configured in this process, like ``main.py`` does minus the server."""
    comfy_path = os.path.abspath(comfy_path)
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    try:
        import torch  # noqa: F401
        configure_comfy_args(device, base_directory)
        import folder_paths
        # As main.py: import ComfyUI's `utils` package before `nodes`, which puts ComfyUI/comfy first on
        # sys.path (after that, `import utils` finds comfy/utils.py and the server module fails).
        import utils.extra_config
    except ImportError as exc:
        raise UsageError(f"ComfyUI at {comfy_path} cannot be imported with this Python ({sys.executable}): "
                         f"{exc}. Run the command with the Python environment ComfyUI uses.") from exc
    # main.py: ComfyUI/extra_model_paths.yaml (user model folders) is honoured.
    extra_paths = os.path.join(comfy_path, "extra_model_paths.yaml")
    if os.path.isfile(extra_paths):
        utils.extra_config.load_extra_path_config(extra_paths)
    if output_directory:
        os.makedirs(output_directory, exist_ok=True)
        folder_paths.set_output_directory(os.path.abspath(output_directory))
    # Preview images go to a private temp folder (ComfyUI wipes its own temp folder at server start).
    temp_directory = temp_directory or tempfile.mkdtemp(prefix="likeness-run-temp-")
    folder_paths.set_temp_directory(temp_directory)


# --------------------------------------------------------------------------------------------------
# Loading nodes


@dataclass
class LoadReport:
    pack_module: str | None = None
    pack_failed: bool = False
    failed: list[str] = field(default_factory=list)


class StubServer:
    """The parts of ComfyUI's ``PromptServer`` the executor and nodes touch, without the web server.

    ``send_sync`` forwards every executor event (``executing``, ``progress``, ``executed``,
    ``execution_error`` ...) to ``on_event(event, data)``.
    """

    def __init__(self, on_event: Callable[[str, Any], None] | None = None):
        self.on_event = on_event
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.supports: set = set()
        self.prompt_queue = None
        self.loop = None
        self.number = 0
        try:  # custom nodes register web routes at import: give them somewhere to put them
            from aiohttp import web
            self.routes = web.RouteTableDef()
            self.app = web.Application()
        except ImportError:
            self.routes = self.app = None

    def send_sync(self, event, data, sid=None) -> None:
        if self.on_event is not None:
            self.on_event(event, data)

    async def send(self, event, data, sid=None) -> None:
        self.send_sync(event, data, sid)

    async def send_json(self, event, data, sid=None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text, node_id, sid=None) -> None:
        self.send_sync("progress_text", {"node": node_id, "text": text}, sid)

    def queue_updated(self) -> None:
        pass

    def add_on_prompt_handler(self, handler) -> None:
        pass


_STUB_SERVER: StubServer | None = None


def stub_server() -> StubServer:
    """The process-wide stub server, installed as ``server.PromptServer.instance`` if there is none."""
    global _STUB_SERVER
    if _STUB_SERVER is None:
        _STUB_SERVER = StubServer()
        try:
            import server
            if getattr(server.PromptServer, "instance", None) is None:
                server.PromptServer.instance = _STUB_SERVER
        except Exception as exc:  # the server module needs aiohttp & co.; the executor does not
            logger.debug("server.PromptServer unavailable (%s); nodes that use it will fail", exc)
    return _STUB_SERVER


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def load_host_nodes(pack_dir: str = PACK_DIR, extra_nodes: list[str] | tuple = (),
                    custom_nodes: bool = True) -> LoadReport:
    """Load ComfyUI's nodes as the server does, then this pack (if not yet loaded) and ``extra_nodes``.

    Idempotent: ComfyUI's built-in nodes are initialised once per process.
    """
    import nodes

    report = LoadReport(failed=load_core_nodes(custom_nodes))
    for name, path in nodes.LOADED_MODULE_DIRS.items():
        if _same_dir(path, pack_dir):
            report.pack_module = name
    if report.pack_module is None:
        if asyncio.run(nodes.load_custom_node(os.path.abspath(pack_dir), module_parent="custom_nodes")):
            report.pack_module = nodes.get_module_name(os.path.abspath(pack_dir))
        else:
            report.pack_failed = True
    for extra in extra_nodes:
        for module_path in _custom_node_modules(extra):
            if any(_same_dir(p, module_path) for p in nodes.LOADED_MODULE_DIRS.values()):
                continue
            if not asyncio.run(nodes.load_custom_node(module_path, module_parent="custom_nodes")):
                report.failed.append(module_path)
    return report


_CORE_LOADED = False


def load_core_nodes(custom_nodes: bool = True) -> list[str]:
    """Core nodes + ``comfy_extras`` (+ ComfyUI's ``custom_nodes`` folders), once per process.

    API (cloud) nodes are skipped: they need network accounts. Returns the custom-node modules that
    failed to import.
    """
    global _CORE_LOADED
    import nodes

    stub_server()
    if _CORE_LOADED:
        return []
    if custom_nodes:
        _drop_missing_custom_node_folders()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
    _CORE_LOADED = True
    return _failed_custom_nodes() if custom_nodes else []


def _drop_missing_custom_node_folders() -> None:
    """ComfyUI lists every custom_nodes folder without checking it exists (a fresh --base-directory)."""
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths["custom_nodes"]
    folder_paths.folder_names_and_paths["custom_nodes"] = ([p for p in paths if os.path.isdir(p)], extensions)


def _custom_node_modules(path: str) -> list[str]:
    """A package folder or .py file is one module; any other folder holds modules (like custom_nodes/)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise UsageError(f"--extra-nodes {path}: no such file or folder.")
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "__init__.py")):
        return [path]
    found = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith((".", "__")) or name.endswith(".disabled"):
            continue
        if (os.path.isfile(full) and name.endswith(".py")) or os.path.isfile(os.path.join(full, "__init__.py")):
            found.append(full)
    return found


def _failed_custom_nodes() -> list[str]:
    import folder_paths
    import nodes

    failed = []
    for base in folder_paths.get_folder_paths("custom_nodes"):
        if not os.path.isdir(base):
            continue
        for name in os.listdir(base):
            full = os.path.join(base, name)
            if name.startswith("__") or name.endswith(".disabled"):
                continue
            if os.path.isfile(full) and not name.endswith(".py"):
                continue
            # load_custom_node keys packages by folder name and single files by their path minus ".py"
            if not ({nodes.get_module_name(full), os.path.splitext(full)[0]} & set(nodes.LOADED_MODULE_DIRS)):
                failed.append(full)
    return failed


# --------------------------------------------------------------------------------------------------
# Executing


def install_progress_hook(server: StubServer) -> None:
    """Route ``comfy.utils.ProgressBar`` updates to ``server`` as ``progress`` events (as main.py does)."""
    import comfy.model_management
    import comfy.utils
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        context = get_executing_context()
        if node_id is None:
            node_id = context.node_id if context is not None else server.last_node_id
        if prompt_id is None:
            prompt_id = context.prompt_id if context is not None else server.last_prompt_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                         server.client_id)

    comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars: the runner prints its own progress lines
    comfy.utils.set_progress_bar_global_hook(hook)


def execute_prompt(prompt: dict, on_event: Callable[[str, Any], None] | None = None,
                   prompt_id: str | None = None) -> dict:
    """Validate and run an API-format ``prompt`` in this process; return the ui outputs per node id.

    Uses ComfyUI's own ``execution.validate_prompt`` and ``execution.PromptExecutor`` (inference
    mode, caching, lazy inputs). Raises :class:`PromptValidationError` (with ComfyUI's
    ``node_errors``) or :class:`PromptExecutionError`. Nodes must be loaded (:func:`load_host_nodes`).
    """
    import execution

    prompt_id = prompt_id or str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise PromptValidationError(describe_validation_error(prompt, valid[1], valid[3]), valid[1], valid[3])

    server = stub_server()
    errors: list[dict] = []

    def forward(event, data):
        if event == "execution_error":
            errors.append(data)
        if on_event is not None:
            on_event(event, data)

    server.on_event = forward
    server.last_prompt_id = prompt_id
    install_progress_hook(server)
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
    try:
        # A client id makes the executor report "executing"/"executed" per node (the progress lines).
        executor.execute(prompt, prompt_id, {"client_id": "likeness-runner"}, valid[2])
    finally:
        server.on_event = None
    if errors or not executor.success:
        details = errors[0] if errors else {}
        raise PromptExecutionError(describe_execution_error(prompt, details), details)
    return executor.history_result["outputs"]


def collect_outputs(outputs: dict, out_dir: str) -> list[str]:
    """Files named in the ui outputs (SaveImage, PreviewImage, ...), copied into ``out_dir`` if elsewhere."""
    import folder_paths

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for node_id, ui in sorted(outputs.items()):
        for items in ui.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if not (isinstance(item, dict) and "filename" in item):
                    continue
                base = folder_paths.get_directory_by_type(item.get("type", "output")) or out_dir
                source = os.path.join(base, item.get("subfolder", ""), item["filename"])
                if not os.path.isfile(source):
                    continue
                if os.path.realpath(source).startswith(os.path.realpath(out_dir) + os.sep):  # SaveImage wrote it here
                    written.append(source)
                    continue
                target = os.path.join(out_dir, item["filename"])
                shutil.copyfile(source, target)
                written.append(target)
    return written


def print_text_outputs(prompt: dict, outputs: dict, stream=None) -> None:
    """Text a node shows in the UI (``ui["text"]``, e.g. a similarity report), printed under its node."""
    for node_id, ui in sorted(outputs.items(), key=lambda kv: _id_key(kv[0])):
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
            if value >= total or now - self.last_step_line > 2.0:  # at most one step line per 2 s
                self.last_step_line = now
                _print(f"      {value}/{total}", self.stream)


def _node_label(prompt: dict, node_id: str) -> str:
    node = prompt.get(node_id, {})
    title = node.get("_meta", {}).get("title")
    class_type = node.get("class_type", "?")
    return f"{class_type} ({title})" if title and title != class_type else class_type


# --------------------------------------------------------------------------------------------------
# Error messages


def load_manifest() -> list[dict]:
    """Entries of ``models_manifest.json`` (empty when absent or unreadable: the runner must still run)."""
    try:
        with open(MANIFEST_PATH, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    models = data.get("models", []) if isinstance(data, dict) else data
    return [m for m in models if isinstance(m, dict)]


def manifest_entry_for(filename: str) -> dict | None:
    """The manifest entry whose file name matches ``filename`` (compared without folders)."""
    wanted = os.path.basename(str(filename).replace("\\", "/")).lower()
    for entry in load_manifest():
        if os.path.basename(str(entry.get("filename", ""))).lower() == wanted:
            return entry
    return None


def fetch_hint(filename: str) -> str:
    """The command that downloads ``filename``, or where to put it by hand."""
    entry = manifest_entry_for(filename)
    if entry is None:
        return ""
    pack = os.path.relpath(PACK_DIR) if not os.path.relpath(PACK_DIR).startswith("../..") else PACK_DIR
    return (f" Get it with: python {pack} models fetch {entry.get('id')} (it goes to "
            f"models/{entry.get('folder', '?')}/).")


def _search_paths(folder: str) -> str:
    try:
        import folder_paths
        return ", ".join(folder_paths.get_folder_paths(folder))
    except Exception:
        return f"models/{folder}"


def describe_validation_error(prompt: dict, error: dict | None, node_errors: dict | None) -> str:
    """One paragraph: which node and input is wrong and what to do (missing model files first)."""
    error = error or {}
    parts = []
    for node_id, info in sorted((node_errors or {}).items()):
        label = f"node #{node_id} ({_node_label(prompt, str(node_id))})"
        for reason in info.get("errors", []):
            extra = reason.get("extra_info", {}) or {}
            name = extra.get("input_name", "")
            value = extra.get("received_value")
            if reason.get("type") == "value_not_in_list" and isinstance(value, str) and _looks_like_file(value):
                folder = MODEL_INPUT_FOLDERS.get(name)
                where = f" (looked in: {_search_paths(folder)})" if folder else ""
                hint = fetch_hint(value) or " Put the file into the matching ComfyUI models folder."
                parts.append(f"{label}: the model file '{value}' for input '{name}' was not found{where}.{hint}")
            else:
                parts.append(f"{label}: {reason.get('message', 'invalid')}: {reason.get('details', '')}".rstrip(": "))
    if not parts:
        parts.append(f"{error.get('message', 'the prompt is invalid')}: {error.get('details', '')}".rstrip(": "))
    return "The workflow did not pass ComfyUI's validation. " + " ".join(
        p if p.endswith(".") else p + "." for p in parts)


def _looks_like_file(value: str) -> bool:
    return os.path.splitext(value)[1].lower() in {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx",
                                                  ".sft", ".gguf", ".json", ".pt2"}


def describe_execution_error(prompt: dict, details: dict) -> str:
    """One paragraph naming the failing node, the error and, for a missing model file, how to get it."""
    node_id = str(details.get("node_id", "?"))
    message = str(details.get("exception_message", "the prompt failed")).strip()
    kind = str(details.get("exception_type", "")).rsplit(".", 1)[-1]
    text = f"Node #{node_id} ({_node_label(prompt, node_id)}) failed: {kind + ': ' if kind else ''}{message}"
    for entry in load_manifest():
        filename = os.path.basename(str(entry.get("filename", "")))
        if filename and filename in message:
            text += fetch_hint(filename)
            break
    return text


# --------------------------------------------------------------------------------------------------
# Workflow files and overrides


def read_workflow(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"workflow file '{path}' does not exist.") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"workflow file '{path}' is not readable JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise UsageError(f"workflow file '{path}' does not hold a JSON object.")
    return data


def is_api_format(workflow: dict) -> bool:
    return bool(workflow) and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())


def to_api_prompt(workflow: dict, node_classes: dict | None = None) -> dict:
    """An API-format prompt from either format (a ``{"prompt": ...}`` wrapper is accepted too)."""
    if "prompt" in workflow and isinstance(workflow["prompt"], dict) and is_api_format(workflow["prompt"]):
        workflow = workflow["prompt"]
    if is_api_format(workflow):
        return json.loads(json.dumps(workflow))
    if "nodes" in workflow and "links" in workflow:
        if node_classes is None:
            import nodes
            node_classes = nodes.NODE_CLASS_MAPPINGS
        return ui_to_api(workflow, node_classes)
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
    raise UsageError(f"--set: no node '{ref}' in the workflow (ids: {', '.join(sorted(prompt, key=_id_key))}).")


def apply_overrides(prompt: dict, overrides: list[tuple[str, str, Any]]) -> None:
    """Apply ``--set`` values; an unknown input name is a usage error listing the known ones."""
    for ref, name, value in overrides:
        node_id = find_node(prompt, ref)
        node = prompt[node_id]
        known = set(node.get("inputs", {})) | _declared_inputs(node.get("class_type"))
        if name not in known:
            raise UsageError(f"--set {ref}.{name}: node #{node_id} ({node.get('class_type')}) has no input "
                             f"'{name}' (inputs: {', '.join(sorted(known)) or 'none'}).")
        node.setdefault("inputs", {})[name] = value


def _declared_inputs(class_type: str | None) -> set:
    """Inputs the node class declares (empty before ComfyUI's nodes are loaded)."""
    try:
        spec = sys.modules["nodes"].NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    except Exception:
        return set()
    return {name for section in ("required", "optional") for name in spec.get(section, {})}


def _id_key(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


# --------------------------------------------------------------------------------------------------
# UI format -> API format


def _links_by_id(workflow: dict) -> dict:
    """link id -> (origin node id, origin slot); links are lists or (newer schema) dicts."""
    links = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            links[link[0]] = (link[1], link[2])
    return links


def _widget_inputs(cls) -> list[tuple[str, Any, dict]]:
    """Inputs shown as widgets, in order: (name, type, options). Typed sockets and forceInput are not."""
    spec = cls.INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
            options = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
            is_combo = isinstance(kind, (list, tuple)) or kind == "COMBO"
            if (is_combo or kind in WIDGET_TYPES) and not options.get("forceInput"):
                widgets.append((name, "COMBO" if is_combo else kind, options))
    return widgets


def _has_seed_control(name: str, kind: Any, options: dict) -> bool:
    return bool(options.get("control_after_generate")) or (kind == "INT" and name in SEED_INPUT_NAMES)


def _is_control_value(value: Any, seed_like: bool) -> bool:
    """The editor's "control after generate" value (old workflows stored a bool for seed widgets)."""
    if isinstance(value, str):
        return value in SEED_CONTROL_VALUES
    return seed_like and isinstance(value, bool)


def _default_value(kind: Any, options: dict, spec_entry: Any = None) -> Any:
    if "default" in options:
        return options["default"]
    if isinstance(spec_entry, (list, tuple)) and spec_entry and isinstance(spec_entry[0], (list, tuple)) and spec_entry[0]:
        return spec_entry[0][0]  # a combo without a default shows its first option
    return None


def map_widget_values(cls, values: Any) -> dict:
    """Widget input values from a UI node's ``widgets_values`` (list in widget order, or a dict).

    Widgets without a stored value take their declared default (old files omit e.g. SaveImage's
    ``filename_prefix``). The extra "control after generate" value after seed widgets is skipped.
    """
    widgets = _widget_inputs(cls)
    if isinstance(values, dict):
        mapped = {name: values[name] for name, _, _ in widgets if name in values}
    else:
        values = list(values or [])
        mapped = {}
        index = 0
        for position, (name, kind, options) in enumerate(widgets):
            if index >= len(values):
                break
            mapped[name] = values[index]
            index += 1
            if index < len(values) and _is_control_value(values[index], _has_seed_control(name, kind, options)):
                following = widgets[position + 1] if position + 1 < len(widgets) else None
                # a generic INT followed by a combo that offers this very value: the value is the combo's
                if not (following and not _has_seed_control(name, kind, options)
                        and values[index] in _combo_options(cls, following[0])):
                    index += 1
    for name, kind, options in widgets:
        if name not in mapped:
            default = _default_value(kind, options, _input_spec(cls, name))
            if default is not None:
                mapped[name] = default
    return mapped


def _input_spec(cls, name: str) -> Any:
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        if name in (spec.get(section) or {}):
            return spec[section][name]
    return None


def _combo_options(cls, name: str) -> list:
    entry = _input_spec(cls, name)
    if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], (list, tuple)):
        return list(entry[0])
    return []


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """Convert the editor's workflow JSON to an API prompt.

    Widgets map to inputs through the node classes' ``INPUT_TYPES`` order; links follow Reroute nodes,
    KJNodes Set/Get pairs and bypassed nodes; PrimitiveNode values are inlined; notes and muted nodes
    are dropped.
    """
    if workflow.get("definitions", {}).get("subgraphs"):
        raise UsageError("this UI workflow uses subgraphs, which the runner does not convert; export it "
                         "with 'Export (API)' in ComfyUI and run that file.")
    ui_nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _links_by_id(workflow)
    setters = {}
    for n in ui_nodes.values():
        if n.get("type") == "SetNode" and n.get("widgets_values"):
            setters[n["widgets_values"][0]] = n

    def input_link(node: dict, slot: int | None = None, type_name: str | None = None):
        inputs = node.get("inputs", []) or []
        if slot is not None and slot < len(inputs):
            return inputs[slot].get("link")
        for item in inputs:
            if item.get("link") is not None and (type_name is None or item.get("type") in (type_name, "*")):
                return item.get("link")
        return None

    def resolve(link_id, depth=0):
        """Follow ``link_id`` to a real node's output: ("link", [node, slot]) / ("value", v) / None."""
        if link_id is None or link_id not in links or depth > 100:
            return None
        origin_id, origin_slot = links[link_id]
        origin = ui_nodes.get(origin_id)
        if origin is None:
            return None
        kind = origin.get("type")
        if kind in REROUTE_TYPES:
            return resolve(input_link(origin, 0), depth + 1)
        if kind in PRIMITIVE_TYPES:
            values = origin.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if kind == "GetNode":
            setter = setters.get((origin.get("widgets_values") or [None])[0])
            return resolve(input_link(setter, 0), depth + 1) if setter else None
        if kind == "SetNode":
            return resolve(input_link(origin, 0), depth + 1)
        if origin.get("mode") == MODE_MUTED:
            return None
        if origin.get("mode") == MODE_BYPASSED:
            outputs = origin.get("outputs", []) or []
            out_type = outputs[origin_slot].get("type") if origin_slot < len(outputs) else None
            inputs = origin.get("inputs", []) or []
            same_slot = inputs[origin_slot] if origin_slot < len(inputs) else None
            if same_slot and same_slot.get("link") is not None and same_slot.get("type") == out_type:
                return resolve(same_slot["link"], depth + 1)
            return resolve(input_link(origin, type_name=out_type), depth + 1)
        return ("link", [str(origin_id), origin_slot])

    prompt = {}
    for node_id, node in sorted(ui_nodes.items(), key=lambda kv: _id_key(str(kv[0]))):
        kind = node.get("type")
        if kind in NOTE_TYPES | REROUTE_TYPES | PRIMITIVE_TYPES | SET_GET_TYPES:
            continue
        if node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        cls = node_classes.get(kind)
        if cls is None:
            raise PromptValidationError(
                f"The workflow uses node type '{kind}' (node #{node_id}), which is not installed: add the custom "
                f"node package that provides it to ComfyUI's custom_nodes (or pass --extra-nodes).")
        inputs = map_widget_values(cls, node.get("widgets_values"))
        for item in node.get("inputs", []) or []:
            resolved = resolve(item.get("link"))
            if resolved is None:
                continue
            inputs[item["name"]] = resolved[1]
        entry = {"class_type": kind, "inputs": inputs}
        title = node.get("title")
        entry["_meta"] = {"title": title or getattr(cls, "DISPLAY_NAME", None) or kind}
        prompt[str(node_id)] = entry
    return prompt


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python cli/runner.py WORKFLOW ...``); the pack's CLI calls run_from_args."""
    parser = argparse.ArgumentParser(prog="likeness run", description=__doc__.split("\n")[0])
    add_run_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
