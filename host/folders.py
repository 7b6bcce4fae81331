"""Model folders the pack uses, registered with ComfyUI's ``folder_paths`` (extension filtered).

Layout under ComfyUI's ``models/``:

- ``insightface/models/<pack>/*.onnx``: insightface model packs (shared with other face packs).
- ``likeness/<kind>/``: the pack's own files (``fusion``, ``consistentid``, ``faceid``, ``parsing``,
  ``identities``, ``embeds``).
- ``loras/likeness/``: LoRAs the pack trains (loaded by the stock LoraLoader).
- ``pulid/``: PuLID-FLUX weights (the folder other PuLID-Flux packs use, so one copy serves both).

Paths from ``extra_model_paths.yaml`` are kept: registration only adds the default folder and sets
the extension filter.
"""
from __future__ import annotations

import os

from . import comfy_available
from .paths import MODEL, resolve_user_path

WEIGHT_EXTENSIONS = {".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".sft"}
INSIGHTFACE_EXTENSIONS = {".onnx", ".pth", ".safetensors"}
LIKENESS_EXTENSIONS = WEIGHT_EXTENSIONS | {".json"}

# folder name -> (default path relative to models/, extensions)
FOLDERS: dict[str, tuple[str, set[str]]] = {
    "insightface": ("insightface", INSIGHTFACE_EXTENSIONS),
    "likeness": ("likeness", LIKENESS_EXTENSIONS),
    "pulid": ("pulid", WEIGHT_EXTENSIONS),   # PuLID-FLUX weights, where the ComfyUI PuLID ports keep them
}
LORA_SUBFOLDER = "likeness"


def register_model_folders() -> bool:
    """Register the pack's folders with ``folder_paths``; returns False outside ComfyUI."""
    if not comfy_available():
        return False
    import folder_paths

    for name, (relative, extensions) in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, relative)
        if name in folder_paths.folder_names_and_paths:
            paths, old_ext = folder_paths.folder_names_and_paths[name]
            paths = list(paths)
            if default not in paths:
                paths.append(default)
            merged = set(old_ext) | extensions if old_ext else set(extensions)
            folder_paths.folder_names_and_paths[name] = (paths, merged)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(extensions))
    return True


def models_dir() -> str:
    """ComfyUI's models directory, or ``$LIKENESS_MODELS_DIR`` / ``./models`` outside ComfyUI."""
    env = os.environ.get("LIKENESS_MODELS_DIR")
    if env:
        return env
    if comfy_available():
        import folder_paths
        return folder_paths.models_dir
    return os.path.abspath("models")


def folder_candidates(folder: str) -> list[str]:
    """Every directory searched for ``folder`` (e.g. ``"insightface"``, ``"loras"``)."""
    if comfy_available():
        import folder_paths
        if folder in folder_paths.folder_names_and_paths:
            return folder_paths.get_folder_paths(folder)
    return [os.path.join(models_dir(), FOLDERS.get(folder, (folder, None))[0])]


def list_files(folder: str, subfolder: str = "", extensions: set[str] | None = None) -> list[str]:
    """Relative file names under ``folder[/subfolder]`` (recursively), sorted, filtered by extension."""
    extensions = extensions or FOLDERS.get(folder, (None, WEIGHT_EXTENSIONS))[1]
    names: set[str] = set()
    for base in folder_candidates(folder):
        root = os.path.join(base, subfolder) if subfolder else base
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if os.path.splitext(f)[1].lower() in extensions:
                    names.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(names)


def resolve(folder: str, name: str, subfolder: str = "") -> str:
    """Full path of ``name`` in ``folder[/subfolder]``; FileNotFoundError says where it was looked for.

    In a ComfyUI server a ``name`` that leads out of the model folders (``..``, an absolute path) is refused
    with PathNotAllowedError (host/paths.py), before anything is looked up."""
    tried = []
    for base in folder_candidates(folder):
        path = os.path.join(base, subfolder, name) if subfolder else os.path.join(base, name)
        path = resolve_user_path(path, MODEL, f"{folder} file '{name}'")
        tried.append(path)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"'{name}' was not found. Looked in: {', '.join(tried)}. "
        f"Run `python <ComfyUI>/custom_nodes/<this pack> models verify` to see which files are missing and where they go.")


def save_dir(folder: str, subfolder: str = "") -> str:
    """The first search path of ``folder`` (plus subfolder), created if needed: where new files are written."""
    path = folder_candidates(folder)[0]
    if subfolder:
        path = os.path.join(path, subfolder)
    os.makedirs(path, exist_ok=True)
    return path


def output_dir() -> str:
    """ComfyUI's output folder (where Save Image writes), or ``$LIKENESS_OUTPUT_DIR`` / ``./output`` outside it."""
    env = os.environ.get("LIKENESS_OUTPUT_DIR")
    if env:
        return os.path.abspath(env)
    if comfy_available():
        import folder_paths
        return os.path.abspath(folder_paths.get_output_directory())
    return os.path.abspath("output")


def new_output_stem(prefix: str, tag: str) -> str:
    """``<output>/<subfolder>/<name>_<NNNNN>_<tag>`` (no extension) for a Save node's ``subfolder/name`` prefix, with
    the next number no file of that name and tag uses; a prefix leading out of the output folder is refused."""
    import re

    from ..errors import PathNotAllowedError
    from .paths import is_inside

    root = output_dir()
    relative = os.path.normpath(prefix.strip() or "likeness")
    folder = os.path.abspath(os.path.join(root, os.path.dirname(relative)))
    if os.path.isabs(relative) or not is_inside(folder, root):
        raise PathNotAllowedError(f"the file name prefix {prefix!r} leads out of the output folder {root}; give a name "
                                  f"or subfolder/name inside it.")
    name = os.path.basename(relative)
    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)_{re.escape(tag)}\.")
    used = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    return os.path.join(folder, f"{name}_{max(used, default=0) + 1:05d}_{tag}")
