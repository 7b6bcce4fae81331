"""ComfyUI's real server, headless on 127.0.0.1, with this pack in its custom_nodes folder.

Proves: the server starts with the pack installed the way users install it (a folder in
``custom_nodes``), ``/object_info`` lists every node of the pack, and the log shows no import
failure for the pack. The server is always killed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from browser_support import free_port
from conftest import COMFYUI_PATH, ROOT

pytestmark = pytest.mark.host

PACK_FOLDER = "comfyui-likeness"
BROKEN_FOLDER = "likeness_test_broken_pack"
START_TIMEOUT = 180  # seconds: generous, the server starts much slower on a shared machine


def _get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, json.loads(response.read().decode("utf-8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server_base")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / PACK_FOLDER, target_is_directory=True)
    # Negative control: a pack that fails to import must show up in the log the way the test looks for it.
    (base / "custom_nodes" / BROKEN_FOLDER).mkdir()
    (base / "custom_nodes" / BROKEN_FOLDER / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    port = free_port()
    log_path = base / "server.log"
    command = [sys.executable, os.path.join(COMFYUI_PATH, "main.py"), "--cpu", "--use-pytorch-cross-attention",
               "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                status, _ = _get(url + "/system_stats", timeout=2)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "log": log_path, "base": base}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def test_object_info_lists_every_pack_node(server):
    from likeness import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    status, info = _get(server["url"] + "/object_info", timeout=60)
    assert status == 200
    assert "KSampler" in info  # the core nodes are there
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"pack nodes missing from /object_info: {missing}"
    for node_id in NODE_CLASS_MAPPINGS:
        entry = info[node_id]
        assert entry["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert entry["category"].startswith("Likeness")
        assert entry["python_module"] == f"custom_nodes.{PACK_FOLDER}"


def _import_failures(log: str, folder: str) -> list[str]:
    return [line for line in log.splitlines() if folder in line and re.search(r"Cannot import|IMPORT FAILED", line)]


def test_log_shows_the_pack_imported_without_failure(server):
    log = server["log"].read_text()
    assert _import_failures(log, BROKEN_FOLDER), "the negative control's import failure is not in the log"
    assert not _import_failures(log, PACK_FOLDER), "\n".join(_import_failures(log, PACK_FOLDER))
    pack_lines = [line for line in log.splitlines() if PACK_FOLDER in line]
    # The import-times table names the pack without "(IMPORT FAILED)"
    assert any(re.search(r"seconds: .*custom_nodes/" + re.escape(PACK_FOLDER) + "$", line) for line in pack_lines), log[-3000:]
    # No traceback runs through the pack's files (warnings logged with a traceback would show here)
    lines = log.splitlines()
    for start, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
            block = "\n".join(lines[start:end])  # a traceback ends at the first blank line
            assert PACK_FOLDER not in block and ROOT not in block, block
