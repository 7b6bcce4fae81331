"""insightface backend: ONNX model packs under ``models/insightface/models/<pack>/``.

What this does differently from ``insightface.app.FaceAnalysis`` (and why):

- It never downloads. ``FaceAnalysis`` fetches a pack from GitHub when its folder is missing; here a
  missing, nested (``antelopev2/antelopev2``), empty or partial folder raises
  :class:`~...errors.ModelFileError` with the expected tree.
- It loads only the models it needs: the detector and the recogniser by default, landmark models on
  request (``FaceAnalysis`` builds a session for every file of the pack). Files are assigned to tasks
  by their well-known names, or, for other names, by insightface's own shape rules read from the
  ONNX graph; each chosen file is then loaded with insightface's ``model_zoo.get_model`` (its real
  routing and pre-processing), and the task it reports is checked.
- Sessions are cached for the life of the process, keyed by pack folder, file versions, providers
  and task set, so a second run (or a second loader node with the same settings) costs nothing.
- ONNX Runtime providers: ``auto`` uses CUDA only when ``torch.cuda.is_available()`` (ROCm when torch
  is a ROCm build), else CPU; an explicit choice the installed ONNX Runtime lacks falls back to CPU
  with one log line. CPU is always appended as the fallback. ORT's own log is kept at errors only.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from ...deps import require
from ...errors import ModelFileError
from ...model_hints import fetch_advice, fetch_ids
from ..types import Face
from .base import Capability

logger = logging.getLogger("likeness")

PROVIDER_CHOICES = ("auto", "CPU", "CUDA", "ROCm", "CoreML", "DirectML")
ORT_PROVIDER_NAMES = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
}
LANDMARK_CHOICES = ("none", "106", "68", "106+68")
LANDMARK_TASKS = {"106": "landmark_2d_106", "68": "landmark_3d_68"}

DETECTION, RECOGNITION = "detection", "recognition"

# File names of the public packs (buffalo_l/m/s/sc, antelopev2) -> the task insightface routes them to.
KNOWN_FILES = {
    "det_10g.onnx": DETECTION, "det_2.5g.onnx": DETECTION, "det_500m.onnx": DETECTION,
    "scrfd_10g_bnkps.onnx": DETECTION, "scrfd_2.5g_bnkps.onnx": DETECTION, "scrfd_500m_bnkps.onnx": DETECTION,
    "w600k_r50.onnx": RECOGNITION, "w600k_mbf.onnx": RECOGNITION, "glintr100.onnx": RECOGNITION,
    "2d106det.onnx": "landmark_2d_106", "1k3d68.onnx": "landmark_3d_68",
    "genderage.onnx": "genderage", "inswapper_128.onnx": "inswapper",
}

EXPECTED_TREE = """Expected layout (one folder per pack, the .onnx files directly inside it):
  {root}/
      antelopev2/
          1k3d68.onnx  2d106det.onnx  genderage.onnx  glintr100.onnx  scrfd_10g_bnkps.onnx
      buffalo_l/
          1k3d68.onnx  2d106det.onnx  det_10g.onnx  genderage.onnx  w600k_r50.onnx
Any folder with an SCRFD detector (9 or 15 outputs) and an ArcFace recogniser works; landmark and
gender/age files are optional. This pack never downloads models: copy them there yourself."""


# ----------------------------------------------------------------------------------------- providers

def available_ort_providers() -> list[str]:
    ort = require("onnxruntime", "The insightface face analyzer")
    return list(ort.get_available_providers())


def resolve_providers(choice: str) -> list[str]:
    """ORT provider list for a loader choice; CPU is always last (the fallback)."""
    if choice not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {PROVIDER_CHOICES}, got {choice!r}")
    available = available_ort_providers()
    wanted: str | None = None
    if choice == "auto":
        wanted = _auto_gpu_provider(available)
    elif choice != "CPU":
        wanted = ORT_PROVIDER_NAMES[choice]
        if wanted not in available:
            _log_once(f"missing-{wanted}",
                      "Likeness: ONNX Runtime provider %s is not available in this ONNX Runtime (%s); using CPU. "
                      "Install the matching onnxruntime build (e.g. onnxruntime-gpu for CUDA) to use it.",
                      choice, ", ".join(available))
            wanted = None
    if wanted and not _provider_starts(wanted):
        _log_once(f"broken-{wanted}",
                  "Likeness: ONNX Runtime lists %s but cannot start it here (missing CUDA/cuDNN/driver libraries "
                  "of the version this onnxruntime build needs?); using CPU.", wanted)
        wanted = None
    return ([wanted] if wanted else []) + ["CPUExecutionProvider"]


_PROVIDER_WORKS: dict[str, bool] = {}


def _provider_starts(name: str) -> bool:
    """Whether ORT really activates ``name``: onnxruntime-gpu lists CUDA even when its libraries are missing,
    and then prints errors for every session. Probed once per process on a one-node model, quietly."""
    if name not in _PROVIDER_WORKS:
        ort = require("onnxruntime", "The insightface face analyzer")
        onnx = require("onnx", "The insightface face analyzer")
        helper = onnx.helper
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        ort.set_default_logger_severity(4)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = ort.InferenceSession(model.SerializeToString(),
                                               providers=list(dict.fromkeys([name, "CPUExecutionProvider"])))
            _PROVIDER_WORKS[name] = name in session.get_providers()
        except Exception:
            _PROVIDER_WORKS[name] = False
        finally:
            ort.set_default_logger_severity(3)   # errors only, as insightface's FaceAnalysis sets it
    return _PROVIDER_WORKS[name]


def _auto_gpu_provider(available: list[str]) -> str | None:
    # ORT-gpu lists CUDA even when the CUDA/cuDNN libraries it needs are missing, and then logs errors
    # on every session. torch knowing a working GPU is the cheap, quiet test.
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        rocm = getattr(torch.version, "hip", None)
    except Exception:  # torch missing or broken: stay on CPU
        return None
    for name in (["ROCMExecutionProvider", "MIGraphXExecutionProvider"] if rocm else ["CUDAExecutionProvider"]):
        if name in available:
            return name
    return None


_LOGGED: set[str] = set()


def _log_once(key: str, message: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning(message, *args)


# ----------------------------------------------------------------------------------------- pack folders

def pack_roots() -> list[str]:
    """``<insightface folder>/models`` for every configured insightface folder (extra_model_paths kept)."""
    from ...host.folders import folder_candidates

    return [os.path.join(base, "models") for base in folder_candidates("insightface")]


def list_packs() -> list[str]:
    """Names of pack folders that contain .onnx files (directly, or nested one level by mistake)."""
    names = set()
    for root in pack_roots():
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if os.path.isdir(path) and (_onnx_files(path) or _onnx_files(os.path.join(path, name))):
                names.add(name)
    return sorted(names)


def _onnx_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory) if f.lower().endswith(".onnx") and os.path.isfile(os.path.join(directory, f)))


def resolve_pack(name: str) -> str:
    """The folder of pack ``name`` (or a folder path); ModelFileError with the expected tree otherwise."""
    if os.path.isabs(name) or os.sep in name or "/" in name:
        from ...host.paths import MODEL, resolve_user_path
        candidates = [resolve_user_path(name, MODEL, "insightface pack folder")]
    else:
        candidates = [os.path.join(root, name) for root in pack_roots()]
    roots = pack_roots()
    tree = EXPECTED_TREE.format(root=roots[0] if roots else "models/insightface/models")
    for path in candidates:
        if not os.path.isdir(path):
            continue
        base = os.path.basename(os.path.normpath(path))
        nested = os.path.join(path, base)
        if not _onnx_files(path) and _onnx_files(nested):
            raise ModelFileError(
                f"insightface pack '{name}' is nested one folder too deep: the .onnx files are in {nested}. "
                f"Move them up into {path} (the common 'antelopev2/antelopev2' unzip mistake).\n{tree}")
        if not _onnx_files(path):
            inside = sorted(os.listdir(path))
            raise ModelFileError(
                f"insightface pack folder {path} has no .onnx files"
                f"{' (it holds: ' + ', '.join(inside[:10]) + ')' if inside else ' (it is empty)'}.\n{tree}")
        return path
    hint = ""
    for root in pack_roots():
        misplaced = os.path.join(os.path.dirname(root), name)
        if _onnx_files(misplaced):
            hint = f" Found {misplaced}: it belongs in {os.path.join(root, name)} (note the 'models' level)."
    fetch = fetch_advice(fetch_ids(["insightface/models"], name))
    raise ModelFileError(
        f"insightface pack '{name}' was not found. Looked in: {', '.join(candidates)}.{hint} {fetch}\n{tree}")


# ----------------------------------------------------------------------------------------- routing

_TASK_CACHE: dict[tuple, str | None] = {}


def onnx_task(path: str) -> str | None:
    """The task insightface's ModelRouter gives this file (known names first, else its graph shapes)."""
    known = KNOWN_FILES.get(os.path.basename(path).lower())
    if known:
        return known
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = _task_from_graph(path)
    return _TASK_CACHE[key]


def _task_from_graph(path: str) -> str | None:
    onnx = require("onnx", "Reading insightface model files")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable ONNX file ({exc}). Re-copy it; it may be truncated.") from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(graph.output) >= 5:
        return DETECTION
    if not inputs:
        return None
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        return None
    height, width = dims[2], dims[3]
    if height == width == 192:
        return "landmark"          # 2d106 or 3d68: decided by the output size when loaded
    if height == width == 96:
        return "genderage"
    if len(inputs) == 2 and height == width == 128:
        return "inswapper"
    if height == width and height >= 112 and height % 16 == 0:
        return RECOGNITION
    return None


@dataclass
class PackFiles:
    """Which file of a pack serves which task."""

    path: str
    tasks: dict[str, str] = field(default_factory=dict)     # task -> file name (first in sorted order wins)
    ignored: list[str] = field(default_factory=list)

    def describe(self) -> str:
        found = ", ".join(f"{f} -> {t}" for t, f in sorted(self.tasks.items(), key=lambda kv: kv[1]))
        return found or "no usable model"


def scan_pack(path: str) -> PackFiles:
    files = PackFiles(path)
    for name in _onnx_files(path):
        try:
            task = onnx_task(os.path.join(path, name))
        except ModelFileError:           # an unreadable extra file must not block the models that are fine
            files.ignored.append(f"{name} (unreadable)")
            continue
        if task is None:
            files.ignored.append(name)
        elif task not in files.tasks:
            files.tasks[task] = name
    return files


# ----------------------------------------------------------------------------------------- loading

@dataclass
class _LoadedModels:
    detector: object
    recognizer: object | None
    landmarkers: dict[str, object]
    providers: list[str]


# One insightface model object (and its ONNX Runtime session) per file version and provider list, shared
# by every analyzer that needs that file: a second loader with other landmark settings only adds sessions.
_MODEL_CACHE: dict[tuple, object] = {}
_CACHE_LOCK = threading.Lock()


def clear_session_cache() -> None:
    with _CACHE_LOCK:
        _MODEL_CACHE.clear()


def cached_session_count() -> int:
    return len(_MODEL_CACHE)


def load_insightface(pack: str, provider: str = "auto", landmarks: str = "none", recognition: bool = True,
                     det_size: int = 640, det_thresh: float = 0.5) -> "InsightFaceAnalyzer":
    """Load a pack as a FACE_ANALYZER (sessions cached across calls)."""
    if landmarks not in LANDMARK_CHOICES:
        raise ValueError(f"landmarks must be one of {LANDMARK_CHOICES}, got {landmarks!r}")
    require("insightface", "The insightface face analyzer")
    path = resolve_pack(pack)
    files = scan_pack(path)
    wanted = [DETECTION] + ([RECOGNITION] if recognition else [])
    wanted_landmarks = [] if landmarks == "none" else landmarks.split("+")
    missing = [t for t in wanted if t not in files.tasks]
    if missing:
        raise ModelFileError(
            f"insightface pack {path} has no {' and no '.join(missing)} model (found: {files.describe()}"
            f"{'; not recognised: ' + ', '.join(files.ignored) if files.ignored else ''}). A pack needs an SCRFD "
            f"detector (9 or 15 outputs) and an ArcFace recogniser (square input, one output); the folder may be "
            f"incomplete.\n{EXPECTED_TREE.format(root=os.path.dirname(path))}")
    if wanted_landmarks and "landmark" not in files.tasks and not any(
            LANDMARK_TASKS[k] in files.tasks for k in wanted_landmarks):
        raise ModelFileError(f"insightface pack {path} has no landmark model (2d106det.onnx / 1k3d68.onnx); "
                             f"found: {files.describe()}. Set landmarks to 'none' or add the files.")
    providers = resolve_providers(provider)
    chosen = {t: files.tasks[t] for t in wanted}
    for kind in wanted_landmarks:
        task = LANDMARK_TASKS[kind]
        if task in files.tasks:
            chosen[task] = files.tasks[task]
        elif "landmark" in files.tasks:
            chosen[task] = files.tasks["landmark"]   # decided by its output size when loaded
    models = _load_models(path, chosen, providers)
    name = os.path.basename(os.path.normpath(path))
    return InsightFaceAnalyzer(models, pack=name, pack_path=path, files=chosen, det_size=det_size,
                               det_thresh=det_thresh)


def _session_options():
    ort = require("onnxruntime", "The insightface face analyzer")
    options = ort.SessionOptions()
    options.log_severity_level = 3      # errors only: ORT warns about unused initializers etc. on every load
    return options


def _load_models(path: str, chosen: dict[str, str], providers: list[str]) -> _LoadedModels:
    loaded = {task: _cached_model(os.path.join(path, file_name), task, providers) for task, file_name in chosen.items()}
    landmarkers = {}
    for task in LANDMARK_TASKS.values():
        model = loaded.get(task)
        if model is not None:
            landmarkers[model.taskname] = model
    return _LoadedModels(loaded[DETECTION], loaded.get(RECOGNITION), landmarkers, providers)


def _cached_model(file_path: str, task: str, providers: list[str]):
    stat = os.stat(file_path)
    key = (os.path.realpath(file_path), stat.st_size, stat.st_mtime_ns, tuple(providers))
    with _CACHE_LOCK:
        model = _MODEL_CACHE.get(key)
        if model is None:
            model = _load_model(file_path, task, providers)
            _MODEL_CACHE[key] = model
    if not _task_matches(task, getattr(model, "taskname", None)):
        raise ModelFileError(f"{file_path} was expected to be a {task} model but insightface routes it to "
                             f"{model.taskname}; remove or rename it.")
    return model


def _load_model(file_path: str, task: str, providers: list[str]):
    """One file through insightface's own ``model_zoo.get_model`` (its shape routing and pre-processing)."""
    from insightface.model_zoo import model_zoo

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = model_zoo.get_model(file_path, providers=providers, sess_options=_session_options())
    except Exception as exc:
        raise ModelFileError(f"insightface could not load {file_path} ({type(exc).__name__}: {exc}). The file may "
                             f"be truncated or not an insightface model.") from exc
    got = getattr(model, "taskname", None)
    if model is None or not _task_matches(task, got):
        raise ModelFileError(f"{file_path} was expected to be a {task} model but insightface routes it to "
                             f"{got or 'nothing'}; remove or rename it.")
    if task == DETECTION and not getattr(model, "use_kps", False):
        raise ModelFileError(f"detector {file_path} has no keypoint outputs (6 or 10 outputs). Alignment and "
                             f"recognition need an SCRFD detector with keypoints (9 or 15 outputs, e.g. det_10g).")
    model.prepare(0)
    _check_active_provider(model, providers, file_path)
    return model


def _task_matches(expected: str, got: str | None) -> bool:
    if got is None:
        return False
    if expected.startswith("landmark"):
        return got.startswith("landmark")
    return got == expected


def _check_active_provider(model, providers: list[str], file_path: str) -> None:
    session = getattr(model, "session", None)
    if session is None or len(providers) < 2:
        return
    active = session.get_providers()
    if providers[0] not in active:
        _log_once(f"fallback-{providers[0]}",
                  "Likeness: ONNX Runtime could not start %s for %s (missing CUDA/cuDNN or driver libraries?); "
                  "running on CPU.", providers[0], os.path.basename(file_path))


# ----------------------------------------------------------------------------------------- analyzer

class InsightFaceAnalyzer:
    """FACE_ANALYZER over a loaded insightface pack (see :mod:`.base` for the protocol)."""

    backend = "insightface"

    def __init__(self, models: _LoadedModels, pack: str, pack_path: str, files: dict[str, str],
                 det_size: int = 640, det_thresh: float = 0.5):
        self._models = models
        self.pack = pack
        self.pack_path = pack_path
        self.files = dict(files)
        self.default_det_size = int(det_size)
        self.default_det_thresh = float(det_thresh)
        rec_file = files.get(RECOGNITION)
        self.model_id = f"insightface:{pack}/{os.path.splitext(rec_file)[0]}" if rec_file else f"insightface:{pack}/none"
        self.embedding_dim = _embedding_dim(models.recognizer)
        caps = {Capability.DETECT, Capability.KPS5}
        if models.recognizer is not None:
            caps.add(Capability.EMBED)
        for task in models.landmarkers:
            caps.add(Capability.LANDMARKS_106 if task.endswith("106") else Capability.LANDMARKS_68)
            if task.endswith("68"):
                caps.add(Capability.POSE)
        self.capabilities = frozenset(caps)

    @property
    def providers(self) -> list[str]:
        return list(self._models.providers)

    def describe(self) -> str:
        caps = ", ".join(sorted(c.value for c in self.capabilities))
        return (f"insightface pack '{self.pack}' ({', '.join(f'{t}: {f}' for t, f in sorted(self.files.items()))}); "
                f"providers {self.providers}; {caps}")

    def detect(self, image: np.ndarray, det_size: int | None = None, det_thresh: float | None = None) -> list[Face]:
        size = int(det_size or self.default_det_size)
        size = max(32, size - size % 32)              # SCRFD's coarsest stride
        thresh = self.default_det_thresh if det_thresh is None else float(det_thresh)
        bgr = np.ascontiguousarray(image[..., ::-1])
        detector = self._models.detector
        input_size = None if detector.static_input_size is not None else (size, size)
        bboxes, kpss = detector.detect(bgr, input_size=input_size, max_num=0, det_thresh=thresh)
        # Dense landmarks are not computed here: the analysis asks for them for the selected faces only.
        return [Face(bbox=bboxes[i, :4].astype(np.float32), score=float(bboxes[i, 4]),
                     kps=kpss[i].astype(np.float32)) for i in range(bboxes.shape[0])]

    def landmarks(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        if not self._models.landmarkers:
            return faces
        from insightface.app.common import Face as InsightFace

        bgr = np.ascontiguousarray(image[..., ::-1])
        out = []
        for face in faces:
            native = InsightFace(bbox=face.bbox.astype(np.float32), kps=face.kps, det_score=face.score)
            sets = dict(face.landmark_sets)
            pose = face.pose
            for task, model in self._models.landmarkers.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    points = model.get(bgr, native)
                kind = "106" if task.endswith("106") else "68"
                sets[kind] = np.asarray(points)[:, :2].astype(np.float32)
                if native.get("pose") is not None:
                    pitch, yaw, roll = (float(v) for v in native["pose"])
                    pose = np.array([yaw, pitch, roll], dtype=np.float32)
            kind = "106" if "106" in sets else "68"
            out.append(replace(face, landmarks=sets[kind], landmark_kind=kind, landmark_sets=sets, pose=pose))
        return out

    def embed(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        recognizer = self._models.recognizer
        if recognizer is None:
            raise ModelFileError("this insightface analyzer was loaded without a recognition model; "
                                 "load it with recognition on to compute identity embeddings.")
        if not faces:
            return []
        from insightface.utils import face_align

        bgr = np.ascontiguousarray(image[..., ::-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # skimage 0.26 deprecates the estimate() insightface calls
            crops = [face_align.norm_crop(bgr, landmark=f.kps, image_size=recognizer.input_size[0]) for f in faces]
        features = np.asarray(recognizer.get_feat(crops), dtype=np.float32).reshape(len(faces), -1)
        return [replace(f, embedding=features[i].copy()) for i, f in enumerate(faces)]


def _embedding_dim(recognizer) -> int | None:
    if recognizer is None:
        return None
    shape = getattr(recognizer, "output_shape", None) or []
    dims = [d for d in shape[1:] if isinstance(d, int)]
    return int(np.prod(dims)) if dims else None
