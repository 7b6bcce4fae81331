"""The model manifest: load and validate it, find ComfyUI's models folder, and check files on disk.

``models_manifest.json`` lists every file a user may need: where it goes (relative to ComfyUI's
``models/``), where it comes from, its sha256 and size when the publisher shows them, and its licence.
This module only reads: downloads live in :mod:`.fetch`, printing in :mod:`.main`.

Standard library only, plus PyYAML (a ComfyUI requirement) when an ``extra_model_paths.yaml`` is read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from ..deps import require
from ..errors import LikenessError

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MANIFEST = os.path.join(PACK_DIR, "models_manifest.json")
MODELS_DIR_ENV = "LIKENESS_MODELS_DIR"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

ENTRY_KEYS = {"id", "filename", "folder", "url", "sha256", "size", "license", "techniques", "required", "notes"}
OPTIONAL_ENTRY_KEYS = {"approx_size_mb", "archive", "alt_folders", "alternatives"}
ALTERNATIVE_KEYS = {"url", "sha256", "size", "approx_size_mb", "notes"}
_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# ComfyUI's own second default folder for some keys (folder_paths.py), and its legacy key names.
COMFY_EXTRA_DEFAULT_DIRS = {"controlnet": ["t2i_adapter"]}
COMFY_LEGACY_KEYS = {"unet": "diffusion_models", "clip": "text_encoders"}

# A file whose size is below this share of the approximate size is reported as probably truncated.
TRUNCATION_RATIO = 0.9


class ManifestError(LikenessError):
    """The manifest file is unreadable or breaks the schema; the message lists every problem."""


class ModelsDirError(LikenessError):
    """ComfyUI's models folder could not be determined."""


# --------------------------------------------------------------------------------------------------
# Manifest entries


@dataclass(frozen=True)
class Alternative:
    """Another accepted source of the same file (e.g. the upstream release of a re-hosted file)."""
    url: str
    sha256: str = ""
    size: int | None = None
    approx_size_mb: float | None = None
    notes: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable file (or one zip archive whose members are installed into ``folder``)."""
    id: str
    filename: str
    folder: str
    url: str
    sha256: str
    size: int | None
    license: str
    techniques: tuple[str, ...]
    required: bool
    notes: str = ""
    approx_size_mb: float | None = None
    archive_members: tuple[str, ...] = ()
    alt_folders: tuple[str, ...] = ()
    alternatives: tuple[Alternative, ...] = ()

    @property
    def is_archive(self) -> bool:
        return bool(self.archive_members)

    @property
    def installed_files(self) -> tuple[str, ...]:
        """The file names that end up in ``folder``: the archive members, or the file itself."""
        return self.archive_members or (self.filename,)

    @property
    def expected_bytes(self) -> int | None:
        """Exact size when known, else the approximate size (for disk-space checks and progress)."""
        if self.size:
            return self.size
        return int(self.approx_size_mb * 1_000_000) if self.approx_size_mb else None


def split_folder(folder: str) -> tuple[str, str]:
    """``"insightface/models/antelopev2"`` -> (``"insightface"``, ``"models/antelopev2"``).

    The first component is the ``folder_paths`` key (what ``extra_model_paths.yaml`` configures).
    """
    key, _, sub = folder.strip("/").partition("/")
    return COMFY_LEGACY_KEYS.get(key, key), sub


def read_json(path: str, error: type[Exception], what: str) -> Any:
    """The JSON document in ``path``; ``error`` naming ``what`` and the path when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist.") from None
    except (OSError, ValueError) as exc:
        raise error(f"{what} '{path}' is not readable JSON: {exc}.") from None


def load_manifest(path: str | None = None) -> list[ModelEntry]:
    """Entries of the manifest at ``path`` (default: the pack's ``models_manifest.json``)."""
    path = path or DEFAULT_MANIFEST
    data = read_json(path, ManifestError, "Model manifest")
    problems = validate_manifest(data)
    if problems:
        raise ManifestError(f"Model manifest '{path}' is invalid:\n  - " + "\n  - ".join(problems))
    return [_entry_from_dict(item) for item in data["models"]]


def _entry_from_dict(item: Mapping) -> ModelEntry:
    archive = item.get("archive") or {}
    return ModelEntry(
        id=item["id"], filename=item["filename"], folder=item["folder"].strip("/"), url=item["url"],
        sha256=item["sha256"].lower(), size=item["size"], license=item["license"],
        techniques=tuple(item["techniques"]), required=item["required"], notes=item["notes"],
        approx_size_mb=item.get("approx_size_mb"), archive_members=tuple(archive.get("members", ())),
        alt_folders=tuple(f.strip("/") for f in item.get("alt_folders", ())),
        alternatives=tuple(Alternative(url=a["url"], sha256=a.get("sha256", "").lower(), size=a.get("size"),
                                       approx_size_mb=a.get("approx_size_mb"), notes=a.get("notes", ""))
                           for a in item.get("alternatives", ())))


def url_problem(url: object) -> str | None:
    """Why ``url`` may not be downloaded from, or None. https only; plain http only to this machine."""
    if not isinstance(url, str) or not url:
        return "url must be a non-empty string"
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname in LOCAL_HOSTS:
        return None
    return f"url '{url}' must be https:// (plain http is only allowed for 127.0.0.1/localhost)"


def sha256_problem(value: object) -> str | None:
    """Why ``value`` is not an acceptable sha256 field: empty (unknown) or 64 real hex digits."""
    if not isinstance(value, str):
        return "sha256 must be a string (empty when unknown)"
    if value == "":
        return None
    if not _HEX64.match(value.lower()):
        return f"sha256 '{value}' is not 64 hex digits (leave it empty when unknown)"
    if is_placeholder_hash(value.lower()):
        return f"sha256 '{value}' looks like a placeholder, not a real hash (leave it empty when unknown)"
    return None


def is_placeholder_hash(value: str) -> bool:
    """True for made-up digests: few distinct digits, a short repeated pattern, or a counting sequence."""
    if len(set(value)) < 8:
        return True
    for period in (1, 2, 4, 8, 16, 32):
        if value == (value[:period] * (64 // period)):
            return True
    return "0123456789abcdef" in value or "deadbeef" in value or "fedcba9876543210" in value


def _size_problem(value: object, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"{name} must be a positive integer number of bytes, or null when not known exactly"
    return None


def _folder_problem(folder: object, name: str = "folder") -> str | None:
    if not isinstance(folder, str) or not folder.strip("/"):
        return f"{name} must be a non-empty relative path"
    if folder.startswith("/") or "\\" in folder or ".." in folder.split("/") or ":" in folder:
        return f"{name} '{folder}' must be relative to the models folder, with forward slashes and no '..'"
    return None


def validate_manifest(data: object) -> list[str]:
    """Every schema problem of a parsed manifest (an empty list when it is valid)."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        return ["the manifest must be a JSON object with a 'models' list"]
    problems: list[str] = []
    ids: set[str] = set()
    targets: set[tuple[str, str]] = set()
    for index, item in enumerate(data["models"]):
        where = f"models[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be an object")
            continue
        where = f"models[{index}] ({item.get('id', '?')})"
        problems += [f"{where}: {p}" for p in _entry_problems(item)]
        entry_id = item.get("id")
        if isinstance(entry_id, str):
            if entry_id in ids:
                problems.append(f"{where}: duplicate id '{entry_id}'")
            ids.add(entry_id)
        if isinstance(item.get("folder"), str) and isinstance(item.get("filename"), str):
            target = (item["folder"].strip("/"), item["filename"])
            if target in targets:
                problems.append(f"{where}: another entry already installs {target[0]}/{target[1]}")
            targets.add(target)
    return problems


def _entry_problems(item: Mapping) -> list[str]:
    problems = [f"missing key '{k}'" for k in sorted(ENTRY_KEYS - set(item))]
    problems += [f"unknown key '{k}'" for k in sorted(set(item) - ENTRY_KEYS - OPTIONAL_ENTRY_KEYS)]
    if not isinstance(item.get("id"), str) or not _ID_PATTERN.match(item.get("id", "")):
        problems.append("id must be lower-case letters, digits, '.', '_' or '-'")
    filename = item.get("filename")
    if not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
        problems.append("filename must be a plain file name (no folders)")
    problems += [p for p in (_folder_problem(item.get("folder")), url_problem(item.get("url")),
                             sha256_problem(item.get("sha256")), _size_problem(item.get("size"), "size")) if p]
    if not isinstance(item.get("license"), str) or not item.get("license", "").strip():
        problems.append("license must be a non-empty string (say 'None stated (all rights reserved)' if none)")
    techniques = item.get("techniques")
    if not isinstance(techniques, list) or not techniques or not all(isinstance(t, str) and t for t in techniques):
        problems.append("techniques must be a non-empty list of names")
    return problems + _flag_problems(item) + _archive_problems(item) + _alternative_problems(item)


def _flag_problems(item: Mapping) -> list[str]:
    """``required``, ``notes`` and the approximate size."""
    problems = []
    if not isinstance(item.get("required"), bool):
        problems.append("required must be true or false")
    if not isinstance(item.get("notes"), str):
        problems.append("notes must be a string")
    approx = item.get("approx_size_mb")
    if approx is not None and (isinstance(approx, bool) or not isinstance(approx, (int, float)) or approx <= 0):
        problems.append("approx_size_mb must be a positive number")
    if item.get("size") is None and approx is None:
        problems.append("give approx_size_mb when the exact size is unknown")
    return problems


def _alternative_problems(item: Mapping) -> list[str]:
    """``alt_folders`` (other places the file may be) and ``alternatives`` (other sources)."""
    problems = [p for p in (_folder_problem(f, "alt_folders entry") for f in item.get("alt_folders", []) or []) if p]
    for number, alt in enumerate(item.get("alternatives", []) or []):
        if not isinstance(alt, dict):
            problems.append(f"alternatives[{number}] must be an object")
            continue
        problems += [f"alternatives[{number}]: unknown key '{k}'" for k in sorted(set(alt) - ALTERNATIVE_KEYS)]
        problems += [f"alternatives[{number}]: {p}" for p in (
            url_problem(alt.get("url")), sha256_problem(alt.get("sha256", "")),
            _size_problem(alt.get("size"), "size")) if p]
    return problems


def _archive_problems(item: Mapping) -> list[str]:
    archive = item.get("archive")
    if archive is None:
        return []
    if not isinstance(archive, dict) or archive.get("format") != "zip":
        return ["archive must be {\"format\": \"zip\", \"members\": [...]}"]
    problems = []
    members = archive.get("members")
    if not isinstance(members, list) or not members or not all(
            isinstance(m, str) and m and "/" not in m and "\\" not in m for m in members):
        problems.append("archive.members must be a non-empty list of plain file names")
    if not str(item.get("filename", "")).lower().endswith(".zip"):
        problems.append("an archive entry's filename must end with .zip")
    return problems


def find_entry(entries: Iterable[ModelEntry], entry_id: str) -> ModelEntry | None:
    return next((e for e in entries if e.id == entry_id), None)


def entry_for_file(entries: Iterable[ModelEntry], filename: str) -> ModelEntry | None:
    """The entry that installs ``filename`` (a file or an archive member), compared without folders."""
    wanted = os.path.basename(filename.replace("\\", "/")).lower()
    for entry in entries:
        if wanted in (name.lower() for name in (entry.filename, *entry.installed_files)):
            return entry
    return None


# --------------------------------------------------------------------------------------------------
# Where ComfyUI's models are


@dataclass
class ModelsLocation:
    """ComfyUI's models folder plus the extra folders ``extra_model_paths.yaml`` adds per key."""
    models_dir: str
    source: str
    extra_paths: dict[str, list[str]] = field(default_factory=dict)
    extra_paths_file: str | None = None

    def search_dirs(self, key: str) -> list[str]:
        """Every folder searched for the ``folder_paths`` key ``key``, default folder first."""
        key = COMFY_LEGACY_KEYS.get(key, key)
        dirs = [os.path.join(self.models_dir, key)]
        dirs += [os.path.join(self.models_dir, extra) for extra in COMFY_EXTRA_DEFAULT_DIRS.get(key, [])]
        dirs += self.extra_paths.get(key, [])
        seen, unique = set(), []
        for d in dirs:
            norm = os.path.normcase(os.path.normpath(d))
            if norm not in seen:
                seen.add(norm)
                unique.append(os.path.normpath(d))
        return unique

    def target_dir(self, entry: ModelEntry) -> str:
        """Where ``fetch`` installs ``entry``: the default folder under ``models_dir``."""
        return os.path.join(self.models_dir, *entry.folder.split("/"))

    def target_path(self, entry: ModelEntry, name: str | None = None) -> str:
        return os.path.join(self.target_dir(entry), name or entry.filename)

    def candidate_paths(self, entry: ModelEntry, name: str) -> list[str]:
        """Every place ``name`` of ``entry`` may already be: default folder, yaml folders, alt folders."""
        paths = []
        for folder in (entry.folder, *entry.alt_folders):
            key, sub = split_folder(folder)
            for base in self.search_dirs(key):
                path = os.path.normpath(os.path.join(base, *sub.split("/"), name) if sub else os.path.join(base, name))
                if path not in paths:
                    paths.append(path)
        return paths


def enclosing_comfyui(pack_dir: str = PACK_DIR) -> str | None:
    """The ComfyUI folder when the pack sits in ``ComfyUI/custom_nodes/<pack>`` (symlinks allowed)."""
    for path in dict.fromkeys((os.path.abspath(pack_dir), os.path.realpath(pack_dir))):
        parent = os.path.dirname(path)
        if os.path.basename(parent) == "custom_nodes":
            root = os.path.dirname(parent)
            if os.path.isdir(os.path.join(root, "models")):
                return root
    return None


def resolve_location(models_dir: str | None = None, extra_paths_file: str | None = None,
                     env: Mapping[str, str] | None = None, pack_dir: str = PACK_DIR,
                     warn: Callable[[str], None] | None = None) -> ModelsLocation:
    """Find the models folder: ``--models-dir``, ``$LIKENESS_MODELS_DIR``, else the enclosing ComfyUI.

    ``extra_model_paths.yaml`` is read from ``extra_paths_file`` when given, else from the ComfyUI
    folder (the enclosing one, or the parent of the models folder when it holds one).
    """
    env = os.environ if env is None else env
    comfy_root = None
    if models_dir:
        path, source = models_dir, "--models-dir"
    elif env.get(MODELS_DIR_ENV):
        path, source = env[MODELS_DIR_ENV], f"${MODELS_DIR_ENV}"
    else:
        comfy_root = enclosing_comfyui(pack_dir)
        if comfy_root is None:
            raise ModelsDirError(
                "Cannot tell where ComfyUI's models folder is: this pack is not inside ComfyUI/custom_nodes/. "
                f"Pass --models-dir /path/to/ComfyUI/models (or set {MODELS_DIR_ENV}).")
        path, source = os.path.join(comfy_root, "models"), f"the enclosing ComfyUI ({comfy_root})"
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ModelsDirError(f"The models folder '{path}' (from {source}) is a file, not a folder.")
    location = ModelsLocation(models_dir=path, source=source)
    yaml_path = extra_paths_file
    if yaml_path is None:
        root = comfy_root or os.path.dirname(path)
        candidate = os.path.join(root, "extra_model_paths.yaml")
        yaml_path = candidate if os.path.isfile(candidate) else None
    if yaml_path:
        if not os.path.isfile(yaml_path):
            raise ModelsDirError(f"extra model paths file '{yaml_path}' does not exist.")
        location.extra_paths = read_extra_model_paths(yaml_path, warn=warn)
        location.extra_paths_file = os.path.abspath(yaml_path)
    return location


# --------------------------------------------------------------------------------------------------
# extra_model_paths.yaml (same rules as ComfyUI's utils/extra_config.py)


def read_extra_model_paths(yaml_path: str, warn: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """``folder key -> [absolute folders]`` from a ComfyUI ``extra_model_paths.yaml``.

    Mirrors ``utils/extra_config.load_extra_path_config``: ``base_path`` (``~`` and ``$VARS`` expanded,
    relative to the yaml's folder) prefixes every entry; without it relative entries are relative to
    the yaml's folder; a value may hold several folders, one per line; ``is_default`` puts the
    folders first. A file that is not valid YAML is skipped with a warning.
    """
    config = _load_yaml(yaml_path, warn)
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
    result: dict[str, list[str]] = {}
    for conf in config.values():
        if not isinstance(conf, dict):
            continue
        conf = dict(conf)
        base_path = _base_path(conf.pop("base_path", None), yaml_dir)
        is_default = bool(conf.pop("is_default", False))
        for key, value in conf.items():
            folders = _section_folders(value, base_path, yaml_dir)
            if folders:
                _add_folders(result.setdefault(COMFY_LEGACY_KEYS.get(str(key), str(key)), []), folders, is_default)
    return result


def _add_folders(paths: list[str], folders: list[str], is_default: bool) -> None:
    """As ComfyUI's ``add_model_folder_path``: a folder moves, not repeats; a default one goes first."""
    for folder in folders:
        if folder in paths:
            paths.remove(folder)
        if is_default:
            paths.insert(0, folder)
        else:
            paths.append(folder)


def _load_yaml(yaml_path: str, warn: Callable[[str], None] | None) -> dict:
    """The yaml's top-level mapping (empty, with a warning, when it does not parse as one).

    PyYAML is one of ComfyUI's requirements; without it the models commands say what to install.
    """
    yaml = require("yaml", feature=f"reading {yaml_path}")
    try:
        with open(yaml_path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ModelsDirError(f"cannot read '{yaml_path}': {exc}") from exc
    except yaml.YAMLError as exc:
        problem = f"not valid YAML ({exc})"
    else:
        if data is None or isinstance(data, dict):
            return data or {}
        problem = "the top level is not a mapping"
    if warn:
        warn(f"ignoring {yaml_path}: {problem}")
    return {}


def _base_path(value: object, yaml_dir: str) -> str | None:
    if not value:
        return None
    base_path = os.path.expandvars(os.path.expanduser(str(value)))
    return base_path if os.path.isabs(base_path) else os.path.abspath(os.path.join(yaml_dir, base_path))


def _section_folders(value: object, base_path: str | None, yaml_dir: str) -> list[str]:
    """The absolute folders of one ``key: value`` line (a list, or text with one folder per line)."""
    if value is None:
        return []
    lines = value if isinstance(value, list) else str(value).split("\n")
    folders = []
    for line in (str(v).strip() for v in lines):
        if not line:
            continue
        if base_path:
            full = os.path.join(base_path, line)
        elif os.path.isabs(line):
            full = line
        else:
            full = os.path.abspath(os.path.join(yaml_dir, line))
        folders.append(os.path.normpath(full))
    return folders


# --------------------------------------------------------------------------------------------------
# Checking files on disk

OK, UNVERIFIED, MISSING, SIZE_MISMATCH, HASH_MISMATCH, TRUNCATED, NESTED = (
    "ok", "unverified", "missing", "size mismatch", "hash mismatch", "probably truncated", "nested folder")
PROBLEM_STATES = {SIZE_MISMATCH, HASH_MISMATCH, TRUNCATED}


@dataclass
class FileCheck:
    """The state of one installed file of an entry."""
    name: str
    target: str
    state: str
    path: str | None = None
    detail: str = ""


@dataclass
class EntryStatus:
    entry: ModelEntry
    files: list[FileCheck]

    @property
    def state(self) -> str:
        """The worst state over the entry's files (a corrupt file beats a missing one)."""
        order = [HASH_MISMATCH, SIZE_MISMATCH, TRUNCATED, NESTED, MISSING, UNVERIFIED, OK]
        states = {f.state for f in self.files}
        return next(s for s in order if s in states)

    @property
    def is_problem(self) -> bool:
        return self.state in PROBLEM_STATES

    @property
    def is_missing(self) -> bool:
        return self.state in (MISSING, NESTED)


def file_sha256(path: str, progress: Callable[[int, int], None] | None = None, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    total, done = os.path.getsize(path), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def check_entry(entry: ModelEntry, location: ModelsLocation, hash_files: bool = True,
                hash_progress: Callable[[str, int, int], None] | None = None) -> EntryStatus:
    """Presence, size and (when ``hash_files`` and a hash is published) sha256 of ``entry``'s files."""
    checks = []
    for name in entry.installed_files:
        target = location.target_path(entry, name)
        candidates = location.candidate_paths(entry, name)
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None and not entry.is_archive:  # ComfyUI lists model folders recursively
            path = _find_in_subfolders(candidates, name)
        if path is None:
            nested = _nested_copy(location, entry, name) if entry.is_archive else None
            if nested:
                checks.append(FileCheck(name, target, NESTED, nested,
                                        f"found at {nested}: move the files up into {os.path.dirname(target)}"))
            else:
                checks.append(FileCheck(name, target, MISSING))
            continue
        if entry.is_archive:  # members have no published size or hash
            checks.append(FileCheck(name, target, UNVERIFIED, path, "present, unverified (no published hash)"))
            continue
        state, detail = _check_file(path, entry, hash_files, hash_progress)
        checks.append(FileCheck(name, target, state, path, detail))
    return EntryStatus(entry, checks)


def _find_in_subfolders(candidates: list[str], name: str) -> str | None:
    """``name`` anywhere below the folders of ``candidates`` (ComfyUI finds it there as ``sub/name``)."""
    for candidate in candidates:
        root = os.path.dirname(candidate)
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            if name in files:
                return os.path.join(dirpath, name)
    return None


def _nested_copy(location: ModelsLocation, entry: ModelEntry, name: str) -> str | None:
    """An insightface pack one folder too deep (``antelopev2/antelopev2/x.onnx``), the classic unzip
    mistake: insightface then fails with ``assert 'detection' in self.models``."""
    folder = location.target_dir(entry)
    if not os.path.isdir(folder):
        return None
    for child in sorted(os.listdir(folder)):
        candidate = os.path.join(folder, child, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _check_file(path: str, entry: ModelEntry, hash_files: bool,
                hash_progress: Callable[[str, int, int], None] | None) -> tuple[str, str]:
    actual = os.path.getsize(path)
    sources = [(entry.url, entry.sha256, entry.size, entry.approx_size_mb)]
    sources += [(a.url, a.sha256, a.size, a.approx_size_mb) for a in entry.alternatives]
    # A source whose exact size matches decides; else one with an unknown size whose approximate size fits.
    exact = [s for s in sources if s[2] is not None and s[2] == actual]
    loose = [s for s in sources if s[2] is None and (not s[3] or actual >= s[3] * 1e6 * TRUNCATION_RATIO)]
    for url, sha, size, _approx in exact[:1] or loose[:1]:
        alt_note = "" if url == entry.url else f" (the alternative from {url})"
        size_note = "size matches" if size is not None else "size plausible"
        if not sha:
            return UNVERIFIED, f"present, unverified (no published hash); {size_note}{alt_note}"
        if not hash_files:
            return UNVERIFIED, f"present, {size_note}{alt_note}; sha256 not checked (--quick)"
        got = file_sha256(path, (lambda d, t: hash_progress(path, d, t)) if hash_progress else None)
        if got == sha:
            return OK, f"sha256 verified{alt_note}"
        return HASH_MISMATCH, f"hash mismatch: sha256 {got}, expected {sha}: the file is corrupt or a different file"
    if entry.size is not None:
        return SIZE_MISMATCH, (f"size mismatch: {actual} bytes, expected {entry.size}: truncated or a different "
                               f"file")
    expected = int((entry.approx_size_mb or 0) * 1e6)
    return TRUNCATED, (f"present, unverified (no published hash), but only {format_size(actual)} where about "
                       f"{format_size(expected)} is expected: probably an interrupted download")


def format_size(size: int | None, approx_mb: float | None = None) -> str:
    """``2528373448`` -> ``"2.53 GB"``; unknown exact size -> ``"≈ 669 MB"``; nothing -> ``"?"``."""
    if size is None:
        return f"≈ {format_size(int(approx_mb * 1e6))}" if approx_mb else "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}" if size / scale < 100 else f"{size / scale:.0f} {unit}"
    return f"{size} B"
