"""The host boundary: only ``host/`` may import ComfyUI's modules.

Every ``.py`` file of the pack (the repository without ``tests/``, ``benchmarks/``, virtual environments and
hidden folders) is parsed, and every import in it is checked wherever it stands (module level, inside a
function, a class or a ``try``): ``import x``, ``from x import y``, and ``importlib.import_module("x")`` /
``__import__("x")`` with a literal name. Relative imports are the pack's own. An absolute import whose top-level
name is one of ComfyUI's modules fails the test with its file and line, unless the file is under ``host/``.
"""
from __future__ import annotations

import ast
import os

import pytest

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_FOLDER = "host"
SKIPPED_FOLDERS = {"tests", "benchmarks", "__pycache__"}

# ComfyUI's top-level modules and packages (v0.3.64 checkout). An absolute import of any of these names can
# only mean ComfyUI: the pack imports its own ``nodes`` package relatively.
COMFY_MODULES = frozenset({
    "comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_api_nodes", "comfy_config", "folder_paths",
    "nodes", "node_helpers", "server", "execution", "latent_preview", "api_server", "alembic_db", "comfyui_version",
    "cuda_malloc", "hook_breaker_ac10a0", "new_updater",
})
# ComfyUI's top-level names too generic to mean ComfyUI for certain (other distributions use them as well).
GENERIC_NAMES = frozenset({"app", "utils", "main", "protocol", "middleware"})


def pack_files(root: str = PACK_ROOT) -> list[str]:
    """Every ``.py`` file of the pack, relative to ``root`` (``/`` separated), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        top = os.path.relpath(dirpath, root) == "."
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_FOLDERS
                             and not (top and d.startswith(".venv")))
        found += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                  for f in filenames if f.endswith(".py")]
    return sorted(found)


def _literal_import_call(node: ast.Call) -> str | None:
    """The module name of ``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
        return first.value
    return None


def imported_modules(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import anywhere in ``source``; relative imports are left out."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):
            module = _literal_import_call(node)
            if module:
                found.append((node.lineno, module))
    return sorted(found)


def comfy_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """The imports in ``source`` that reach ComfyUI."""
    return [(line, module) for line, module in imported_modules(source, filename)
            if module.split(".")[0] in COMFY_MODULES]


def boundary_violations(root: str = PACK_ROOT) -> list[str]:
    """``file:line imports module`` for every ComfyUI import outside ``host/``."""
    problems = []
    for relative in pack_files(root):
        if relative.split("/")[0] == HOST_FOLDER:
            continue
        with open(os.path.join(root, relative), encoding="utf-8") as handle:
            source = handle.read()
        problems += [f"{relative}:{line} imports {module}" for line, module in comfy_imports(source, relative)]
    return problems


def test_only_host_imports_comfyui():
    problems = boundary_violations()
    assert not problems, "ComfyUI is imported outside host/ (move the call into a host/ module):\n" + \
        "\n".join(problems)


def test_every_kind_of_import_is_found():
    source = '''
import os
import comfy.sample
from comfy.ldm import openaimodel
from . import sibling
from ..nodes import faceid
import numpy as np, folder_paths


def late():
    import node_helpers
    from nodes import NODE_CLASS_MAPPINGS
    importlib.import_module("comfy_extras.nodes_train")
    __import__("server")
    importlib.import_module(".relative", __package__)
    importlib.import_module(name_from_a_variable)


class Holder:
    try:
        from comfy_execution.graph import ExecutionBlocker
    except ImportError:
        pass
'''
    assert comfy_imports(source) == [(3, "comfy.sample"), (4, "comfy.ldm"), (7, "folder_paths"), (11, "node_helpers"),
                                     (12, "nodes"), (13, "comfy_extras.nodes_train"), (14, "server"),
                                     (21, "comfy_execution.graph")]


def test_the_walk_covers_the_pack_and_skips_tests_benchmarks_and_hidden_folders(tmp_path):
    for relative in ("nodes/a.py", "host/b.py", "tests/c.py", "benchmarks/d.py", ".venv-host/e.py", ".git/f.py",
                     "techniques/.cache/g.py", "techniques/x/h.py", "i.py", "notes.txt"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("import comfy.utils\n", encoding="utf-8")
    assert pack_files(str(tmp_path)) == ["host/b.py", "i.py", "nodes/a.py", "techniques/x/h.py"]
    assert boundary_violations(str(tmp_path)) == ["i.py:1 imports comfy.utils", "nodes/a.py:1 imports comfy.utils",
                                                  "techniques/x/h.py:1 imports comfy.utils"]
    assert "cli/runner.py" in pack_files() and "techniques/faceid/lora.py" in pack_files()


@pytest.mark.host
def test_the_name_list_covers_every_top_level_module_of_comfyui():
    """Each top-level module or package of the ComfyUI checkout is either checked or named as too generic."""
    comfy_root = os.environ["COMFYUI_PATH"]
    names = {entry[:-3] for entry in os.listdir(comfy_root) if entry.endswith(".py")}
    names |= {entry for entry in os.listdir(comfy_root) if entry.isidentifier() and _has_python(comfy_root, entry)}
    names -= {"custom_nodes", "tests", "script_examples"}          # not importable parts of ComfyUI
    assert names - COMFY_MODULES - GENERIC_NAMES == set()


def _has_python(root: str, entry: str) -> bool:
    folder = os.path.join(root, entry)
    return os.path.isdir(folder) and any(name.endswith(".py") for name in os.listdir(folder))
