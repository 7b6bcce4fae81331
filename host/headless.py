"""ComfyUI without its web server: configure it, load its nodes, run a prompt through its executor.

Why: the command line runner (``cli/runner.py``) and the host tests (``tests/host_support.py``) run
graphs in this process through ComfyUI's own ``execution.PromptExecutor``, exactly as the server
would, and this is the only place that touches ComfyUI's process-level machinery (``comfy.cli_args``,
``folder_paths``, ``nodes``, ``server``, ``execution``, ``comfy_execution``). Nothing is imported from
ComfyUI at module level, so importing this module is instant and works without ComfyUI.

Errors carry ComfyUI's structured data (``node_errors``, the ``execution_error`` message); turning
them into user-facing text (model-download hints, node titles) is the caller's job.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import LikenessError

logger = logging.getLogger("likeness")

CLIENT_ID = "likeness-runner"


class HeadlessError(LikenessError):
    """Base class of the problems a headless ComfyUI run reports."""


class HostSetupError(HeadlessError):
    """ComfyUI cannot be imported or configured here, or a custom-node path does not exist."""


class PromptValidationError(HeadlessError):
    """ComfyUI rejected the prompt; ``node_errors`` is ComfyUI's per-node error dict."""

    def __init__(self, message: str, error: dict | None = None, node_errors: dict | None = None):
        super().__init__(message)
        self.error = error or {}
        self.node_errors = node_errors or {}


class PromptExecutionError(HeadlessError):
    """A node raised while the prompt ran; ``details`` is ComfyUI's ``execution_error`` message."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


# --------------------------------------------------------------------------------------------------
# Preparing ComfyUI


def configure_comfy_args(device: str = "cpu", base_directory: str | None = None) -> None:
    """Set ComfyUI's command-line flags before ``comfy.model_management`` reads them at import.

    ``device="cpu"`` is ``--cpu --use-pytorch-cross-attention`` (the attention backend is picked when
    ``comfy.model_management`` is imported, and PyTorch SDPA is the fast one on CPU); ``"auto"`` picks
    the GPU when torch sees one.
    """
    from comfy.cli_args import args

    if device == "auto":
        device = "gpu" if _torch_sees_gpu() else "cpu"
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


def _torch_sees_gpu() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or (mps is not None and mps.is_available())


def prepare_host(comfy_path: str, device: str = "cpu", base_directory: str | None = None,
                 output_directory: str | None = None, temp_directory: str | None = None) -> None:
    """Make ComfyUI importable and configured in this process, like ``main.py`` does minus the server."""
    comfy_path = os.path.abspath(comfy_path)
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    try:
        import torch  # noqa: F401  (a missing torch is reported as "cannot be imported", not a traceback)
        configure_comfy_args(device, base_directory)
        import folder_paths

        # As main.py: import ComfyUI's `utils` package before `nodes`, which puts ComfyUI/comfy first on
        # sys.path (after that, `import utils` finds comfy/utils.py and the server module fails).
        import utils.extra_config
    except ImportError as exc:
        raise HostSetupError(f"ComfyUI at {comfy_path} cannot be imported with this Python ({sys.executable}): "
                             f"{exc}. Run the command with the Python environment ComfyUI uses.") from exc
    # main.py: ComfyUI/extra_model_paths.yaml (user model folders) is honoured.
    extra_paths = os.path.join(comfy_path, "extra_model_paths.yaml")
    if os.path.isfile(extra_paths):
        utils.extra_config.load_extra_path_config(extra_paths)
    if output_directory:
        os.makedirs(output_directory, exist_ok=True)
        folder_paths.set_output_directory(os.path.abspath(output_directory))
    # Preview images go to a private temp folder (ComfyUI wipes its own temp folder at server start).
    folder_paths.set_temp_directory(temp_directory or tempfile.mkdtemp(prefix="likeness-run-temp-"))


# --------------------------------------------------------------------------------------------------
# The stand-in for ComfyUI's PromptServer


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


# --------------------------------------------------------------------------------------------------
# Loading nodes


@dataclass
class LoadReport:
    pack_module: str | None = None
    pack_failed: bool = False
    failed: list[str] = field(default_factory=list)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def load_host_nodes(pack_dir: str, extra_nodes: list[str] | tuple = (), custom_nodes: bool = True) -> LoadReport:
    """Load ComfyUI's nodes as the server does, then the pack at ``pack_dir`` (if not yet loaded) and
    ``extra_nodes`` (package folders, .py files, or folders of them).

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
        for module_path in custom_node_modules(extra):
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


def _is_node_module(folder: str, name: str) -> bool:
    """A custom-node module as ComfyUI's loader sees one: a package folder or a ``.py`` file."""
    if name.startswith("__") or name.endswith(".disabled"):
        return False
    full = os.path.join(folder, name)
    return os.path.isdir(full) or name.endswith(".py")


def custom_node_modules(path: str) -> list[str]:
    """A package folder or .py file is one module; any other folder holds modules (like custom_nodes/)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise HostSetupError(f"extra custom nodes '{path}': no such file or folder.")
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "__init__.py")):
        return [path]
    found = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or not _is_node_module(path, name):
            continue
        if os.path.isfile(full) or os.path.isfile(os.path.join(full, "__init__.py")):
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
            if not _is_node_module(base, name):
                continue
            # load_custom_node keys packages by folder name and single files by their path minus ".py"
            if not ({nodes.get_module_name(full), os.path.splitext(full)[0]} & set(nodes.LOADED_MODULE_DIRS)):
                failed.append(full)
    return failed


def node_classes() -> dict:
    """ComfyUI's ``NODE_CLASS_MAPPINGS`` (every node loaded so far)."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def declared_inputs(class_type: str | None) -> set[str]:
    """Input names the node class declares; empty when ComfyUI's nodes are not loaded or the class is unknown."""
    loaded = sys.modules.get("nodes")
    cls = getattr(loaded, "NODE_CLASS_MAPPINGS", {}).get(class_type) if loaded is not None else None
    if cls is None:
        return set()
    spec = cls.INPUT_TYPES()
    return {name for section in ("required", "optional") for name in (spec.get(section) or {})}


def model_search_paths(folder: str) -> list[str]:
    """The folders ComfyUI searches for the model folder key ``folder`` (empty outside ComfyUI)."""
    try:
        import folder_paths
        return list(folder_paths.get_folder_paths(folder))
    except (ImportError, KeyError):
        return []


# --------------------------------------------------------------------------------------------------
# Executing


def install_progress_hook(server: StubServer) -> None:
    """Route ``comfy.utils.ProgressBar`` updates to ``server`` as ``progress`` events (as main.py does)."""
    import comfy.model_management
    import comfy.utils
    from comfy_execution.utils import get_executing_context

    def hook(value, total, _preview_image, prompt_id=None, node_id=None):   # ProgressBar passes it positionally
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


def new_executor():
    """A ComfyUI ``PromptExecutor`` for several :func:`execute_prompt` calls: as in the server, nodes whose
    inputs did not change (model loaders) keep their outputs from one prompt to the next."""
    import execution

    return execution.PromptExecutor(stub_server(), cache_type=execution.CacheType.CLASSIC)


def execute_prompt(prompt: dict, on_event: Callable[[str, Any], None] | None = None,
                   prompt_id: str | None = None, executor=None) -> dict:
    """Validate and run an API-format ``prompt`` in this process; return the ui outputs per node id.

    Uses ComfyUI's own ``execution.validate_prompt`` and ``execution.PromptExecutor`` (inference
    mode, caching, lazy inputs): a new one, or ``executor`` (:func:`new_executor`) to reuse its cache.
    Raises :class:`PromptValidationError` (with ComfyUI's ``node_errors``) or :class:`PromptExecutionError`.
    Nodes must be loaded (:func:`load_host_nodes`).
    """
    import execution

    prompt_id = prompt_id or str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        error = valid[1] or {}
        message = f"{error.get('message', 'the prompt is invalid')}: {error.get('details', '')}".rstrip(": ")
        raise PromptValidationError(message, error, valid[3])

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
    executor = executor or new_executor()
    try:
        # A client id makes the executor report "executing"/"executed" per node (the progress lines).
        executor.execute(prompt, prompt_id, {"client_id": CLIENT_ID}, valid[2])
    finally:
        server.on_event = None
    if errors or not executor.success:
        details = errors[0] if errors else {}
        raise PromptExecutionError(str(details.get("exception_message", "the prompt failed")).strip(), details)
    return executor.history_result["outputs"]


def _file_items(outputs: dict) -> Iterator[dict]:
    """The ``{"filename", "subfolder", "type"}`` items of the ui outputs, in node id order."""
    for _node_id, ui in sorted(outputs.items()):
        for items in ui.values():
            if isinstance(items, list):
                yield from (item for item in items if isinstance(item, dict) and "filename" in item)


def output_files(outputs: dict, fallback_dir: str) -> list[str]:
    """Existing files the ui outputs name (SaveImage, PreviewImage ...), resolved through ComfyUI's
    output/temp/input folders (``fallback_dir`` for an unknown folder type)."""
    import folder_paths

    paths = []
    for item in _file_items(outputs):
        base = folder_paths.get_directory_by_type(item.get("type", "output")) or fallback_dir
        source = os.path.join(base, item.get("subfolder", ""), item["filename"])
        if os.path.isfile(source):
            paths.append(source)
    return paths
