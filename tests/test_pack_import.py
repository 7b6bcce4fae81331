"""The pack imports without the host and without optional packages, and its nodes are well formed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

BLOCKED = ["insightface", "onnxruntime", "dlib", "face_recognition_models", "diffusers"]


def test_import_with_optional_packages_missing_logs_one_line():
    code = f"""
import sys, logging, io
for name in {BLOCKED!r}:
    sys.modules[name] = None          # makes `import name` raise ImportError
stream = io.StringIO()
logging.basicConfig(stream=stream, level=logging.INFO)
sys.path.insert(0, {ROOT!r})
from _bootstrap import load_pack
pack = load_pack()
from likeness.nodes import FAILED_NODE_MODULES
assert not FAILED_NODE_MODULES, FAILED_NODE_MODULES
lines = [l for l in stream.getvalue().splitlines() if 'optional packages not installed' in l]
print(len(pack.NODE_CLASS_MAPPINGS), len(lines), lines[0] if lines else '')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    n_nodes, n_lines, line = out.stdout.strip().split(" ", 2)
    assert int(n_lines) == 1
    for name in BLOCKED:
        assert name in line


def test_missing_dependency_error_says_what_to_install(monkeypatch):
    from likeness.deps import MissingDependencyError, require

    monkeypatch.setitem(sys.modules, "insightface", None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps insightface"):
        require("insightface", "The insightface analyzer")


def test_no_node_module_failed():
    from likeness.nodes import FAILED_NODE_MODULES

    assert FAILED_NODE_MODULES == {}


def _all_inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            yield name, entry


def test_every_node_is_documented_and_categorised():
    from likeness import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert NODE_CLASS_MAPPINGS, "the pack registers no node"
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Likeness"), node_id
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert cls.CATEGORY.startswith("Likeness"), node_id
        assert isinstance(getattr(cls, "DESCRIPTION", None), str) and len(cls.DESCRIPTION) > 20, node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple), node_id
        for name, entry in _all_inputs(cls):
            assert isinstance(entry, tuple) and len(entry) >= 2 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        json.dumps(cls.INPUT_TYPES(), default=str)


def test_no_v3_entrypoint_exported():
    import likeness

    assert not hasattr(likeness, "comfy_entrypoint")
