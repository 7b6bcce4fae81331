"""ComfyUI's real web frontend in headless Chromium: a server with this pack, a seeded user, a page.

Used by ``tests/test_browser_frontend.py`` and by the example-workflow generator
``tests/workflow_layout.py``. Everything runs offline: the system Chromium (Debian's ``chromium``
package, never a downloaded browser) is driven by the Python ``playwright`` package, and every request
that does not go to the local server is aborted.

    missing_requirements(comfy_path)  what is not installed (empty list = ready)
    ComfyServer(base, comfy_path)     ``main.py`` on a free port; ``with`` starts it and always kills it
    prepare_base(base, pack_dir)      custom_nodes/<PACK_FOLDER> -> the pack, seeded frontend settings
    open_page(playwright, url)        (browser, page) with the app ready and outside requests blocked
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_FOLDER = "likeness"  # the template browser's category is this folder name ("Custom Nodes > likeness")
VIEWPORT = {"width": 1600, "height": 1000}
START_TIMEOUT = 240  # seconds; ~12-30 s alone, minutes when the 2 cores are shared
FRONTEND_VERSION = "1.27.10"
# A fresh user otherwise gets a template modal, a release-notes fetch, a minimap and a startup pageerror
# (the NavigationMode setting writes two Canvas.* settings before they are registered).
USER_SETTINGS = {"Comfy.InstalledVersion": FRONTEND_VERSION, "Comfy.TutorialCompleted": True,
                 "Comfy.Minimap.Visible": False, "Comfy.Notification.ShowVersionUpdates": False,
                 "Comfy.Canvas.LeftMouseClickBehavior": "panning", "Comfy.Canvas.MouseWheelScroll": "zoom"}


def missing_requirements(comfy_path: str | None) -> list[str]:
    """Names of what a browser test needs and this machine lacks."""
    missing = []
    if not comfy_path or not os.path.isfile(os.path.join(comfy_path, "main.py")):
        missing.append("ComfyUI (set COMFYUI_PATH)")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Debian chromium at {CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Python playwright (pip install playwright; never `playwright install`)")
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        missing.append("comfyui-frontend-package (ComfyUI's requirements)")
    return missing


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def post_json(url: str, payload: dict, timeout: float = 30.0):
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read().decode("utf-8")
        return json.loads(body) if body else None


def prepare_base(base: str, pack_dir: str, extra_nodes: tuple[str, ...] = ()) -> None:
    """A ComfyUI base directory: the pack (and ``extra_nodes`` packages) linked into custom_nodes/, the
    frontend user seeded so the page opens straight onto the canvas."""
    for sub in ("custom_nodes", "input", "output", "models", "user/default/workflows", "user/default/subgraphs"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    links = [(pack_dir, PACK_FOLDER)] + [(path, os.path.basename(path.rstrip("/"))) for path in extra_nodes]
    for target, name in links:
        link = os.path.join(base, "custom_nodes", name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(target), link, target_is_directory=True)
    user = os.path.join(base, "user", "default")
    with open(os.path.join(user, "comfy.settings.json"), "w", encoding="utf-8") as handle:
        json.dump(USER_SETTINGS, handle)
    with open(os.path.join(user, "comfy.templates.json"), "w", encoding="utf-8") as handle:
        handle.write("[]")
    open(os.path.join(user, "user.css"), "w").close()


class ComfyServer:
    """``python main.py --cpu`` on 127.0.0.1 with ``base`` as its base directory; log in base/server.log."""

    def __init__(self, base: str, comfy_path: str, python: str = sys.executable):
        self.base, self.comfy_path, self.python = base, comfy_path, python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "server.log")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        command = [self.python, os.path.join(self.comfy_path, "main.py"), "--cpu", "--use-pytorch-cross-attention",
                   "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", self.base,
                   "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=self.comfy_path, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                get_json(self.url + "/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()


def open_page(playwright, url: str):
    """Launch the system Chromium, open the app and wait until the restored workflow is active.

    Returns (browser, page, errors): ``errors`` collects page errors and console errors as they come
    (minus the 404 of the optional /user.css and the aborted outside requests).
    """
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    context = browser.new_context(viewport=VIEWPORT)
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: _console_error(msg, errors))
    page.goto(url + "/")
    page.wait_for_function("() => !!window.app?.extensionManager?.workflow?.activeWorkflow", timeout=120_000)
    return browser, page, errors


def _console_error(message, errors: list[str]) -> None:
    if message.type != "error":
        return
    text = message.text
    if "user.css" in text or "net::ERR_FAILED" in text:
        return
    location = (message.location or {}).get("url", "")
    if location.endswith("user.css"):
        return
    errors.append(f"console: {text}")
