"""Every path a workflow names (training folders, model files typed as paths) is resolved here, and held to
the folders ComfyUI's own loaders read from.

Why: a server started with ``--listen`` runs prompts from anyone who can reach it. ComfyUI's loaders read only
inside ``input/`` and the model folders; a pack input that took any absolute path would let a remote user make
the server read (and, through previews and loss curves, show) any folder the process can see.

The rule, inside ComfyUI:

- ``INPUT`` paths (training folders, caption and evaluation files) are relative to ComfyUI's input folder and
  must stay inside it once symlinks and ``..`` are resolved. A folder's own entries that are symlinks are held
  to the same rule, so a link inside ``input/`` counts as the place it points to.
- ``MODEL`` paths (model files and folders) may also lie in any registered model folder, including those from
  ``extra_model_paths.yaml``. Inside a model folder the path is checked without resolving symlinks: links the
  operator put there are followed, as ComfyUI's own loaders follow them.

A refused path raises :class:`~errors.PathNotAllowedError` before anything at that path is read. The rule is
off where every path is the local user's own: outside ComfyUI (plain tests, scripts), within
:func:`local_user_paths` (the command line), and when the operator sets ``LIKENESS_ALLOW_ANY_PATH=1``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

from ..errors import PathNotAllowedError
from . import comfy_available

INPUT = "input"  # relative to ComfyUI's input folder, confined to it
MODEL = "model"  # a model file or folder: the input folder or any registered model folder
KINDS = (INPUT, MODEL)

ALLOW_ANY_PATH_ENV = "LIKENESS_ALLOW_ANY_PATH"
_TRUE_WORDS = {"1", "true", "yes", "on"}
# folder_paths keys that are not model folders (custom_nodes holds code, not weights)
_NOT_MODEL_FOLDERS = {"custom_nodes"}
_HINTS = {INPUT: "Put the files in ComfyUI's input folder and give the path relative to it.",
          MODEL: "Pick a file in ComfyUI's model folders."}


def any_path_allowed() -> bool:
    """True when the operator (or the command line, see :func:`local_user_paths`) lifted the rule."""
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in _TRUE_WORDS


@contextlib.contextmanager
def local_user_paths() -> Iterator[None]:
    """Accept every path while inside: the command line runs as the local user, who may read these files anyway.

    Set in the environment (not a module flag) because ComfyUI imports this pack a second time under its own
    module name; every copy in the process reads the same variable. The previous value comes back on exit.
    """
    previous = os.environ.get(ALLOW_ANY_PATH_ENV)
    os.environ[ALLOW_ANY_PATH_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ALLOW_ANY_PATH_ENV, None)
        else:
            os.environ[ALLOW_ANY_PATH_ENV] = previous


def resolve_user_path(path: str, kind: str = INPUT, what: str = "path") -> str:
    """The path a workflow input names, or PathNotAllowedError when the server may not read it.

    ``kind`` INPUT: typed text (trimmed, ``~`` expanded); a relative path is taken in ComfyUI's input folder.
    MODEL: the path is used as the caller built it (model-folder lookups pass a full path). ``what`` names the input in the error message.
    Where the rule is off (see the module docstring) the path resolves as it always did: INPUT paths relative
    to the input folder when they exist there, else to the working folder; absolute paths as given.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == INPUT:  # typed into a text box
        path = os.path.expanduser(path.strip())
    if not comfy_available() or any_path_allowed():
        return _unconfined(path, kind)
    import folder_paths

    input_dir = folder_paths.get_input_directory()
    if kind == INPUT and not os.path.isabs(path):
        path = os.path.join(input_dir, path)
    model_dirs = _model_folders() if kind == MODEL else []
    check_allowed(path, [input_dir, *model_dirs], model_dirs, what, _HINTS[kind])
    if kind == INPUT and os.path.isdir(path):
        _check_linked_entries(path, [input_dir], what)
    return path


def _unconfined(path: str, kind: str) -> str:
    if kind == MODEL or os.path.isabs(path):
        return path
    if comfy_available():
        import folder_paths

        candidate = os.path.join(folder_paths.get_input_directory(), path)
        if os.path.exists(candidate) or not os.path.exists(path):
            return candidate
    return os.path.abspath(path)


def _model_folders() -> list[str]:
    """The models folder and every folder the pack looks up models in: each registered ``folder_paths`` key
    (extra_model_paths.yaml folders included) and the pack's own, through :func:`host.folders.folder_candidates`."""
    import folder_paths

    from . import folders  # here, not at the top: host.folders resolves its names through this module

    names = dict.fromkeys([*folder_paths.folder_names_and_paths, *folders.FOLDERS])
    found = [folders.models_dir()]
    for name in names:
        if name not in _NOT_MODEL_FOLDERS:
            found += folders.folder_candidates(name)
    return list(dict.fromkeys(found))


# ---- the rule itself (pure: plain paths in, no ComfyUI) --------------------------------------------

def is_inside(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or below it (both absolute and normalised the same way)."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows) or a mix of absolute and relative
        return False


def allowed_root(path: str, real_roots: Sequence[str], linked_roots: Sequence[str] = ()) -> str | None:
    """The root ``path`` may be read from, or None.

    ``real_roots``: ``path`` with every symlink and ``..`` resolved must lie inside one (a link there counts as
    its target). ``linked_roots``: ``path`` with ``..`` resolved but links kept may lie inside one (links there
    are the operator's, as in ComfyUI's model folders).
    """
    real = os.path.realpath(path)
    for root in real_roots:
        if is_inside(real, os.path.realpath(root)):
            return root
    plain = os.path.abspath(path)
    for root in linked_roots:
        if is_inside(plain, os.path.abspath(root)):
            return root
    return None


def check_allowed(path: str, real_roots: Sequence[str], linked_roots: Sequence[str] = (),
                  what: str = "path", hint: str = _HINTS[INPUT]) -> str:
    """``path`` when :func:`allowed_root` finds its root, else PathNotAllowedError naming ``what``, the
    resolved path, the allowed folders and the opt-in."""
    if allowed_root(path, real_roots, linked_roots) is None:
        raise PathNotAllowedError(_refusal(what, path, [*real_roots, *linked_roots], hint))
    return path


def _check_linked_entries(folder: str, real_roots: Sequence[str], what: str) -> None:
    """A folder's entries that are symlinks must point inside ``real_roots`` too (datasets read them)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                check_allowed(entry.path, real_roots, (), f"{what} entry '{entry.name}'")


def outermost(roots: Sequence[str]) -> list[str]:
    """``roots`` without those inside another one (``models/`` stands for ``models/loras/``), in order."""
    normal = list(dict.fromkeys(os.path.abspath(root) for root in roots))
    return [root for root in normal if not any(other != root and is_inside(root, other) for other in normal)]


def _refusal(what: str, path: str, roots: Sequence[str], hint: str) -> str:
    return (f"{what}: '{path}' resolves to '{os.path.realpath(path)}', outside the folders this ComfyUI server "
            f"lets a workflow read: {', '.join(outermost(roots))}. {hint} A server operator who trusts everyone "
            f"who can reach the server may allow any path by starting ComfyUI with {ALLOW_ANY_PATH_ENV}=1.")
