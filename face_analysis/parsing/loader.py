"""Load BiSeNet face-parsing weights: the official ``79999_iter.pth`` / ConsistentID ``face_parsing.pth``.

Accepted containers: a torch pickle of the flat state dict (read with ``weights_only=True``), a
``.safetensors`` file with the same flat keys, and (tolerated) a dict wrapping the state dict under
``state_dict``/``model`` or keys prefixed ``module.`` (a DDP save). Every key of the architecture must
be present with the right shape and nothing may be left over; ``num_batches_tracked`` buffers are
optional (files saved by old PyTorch versions lack them). Loaded models are cached by file identity.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

from ...errors import CheckpointLayoutError, ModelFileError
from ...model_hints import fetch_advice, fetch_ids
from .bisenet import NUM_CLASSES, BiSeNet

logger = logging.getLogger("likeness")

_OPTIONAL_SUFFIX = "num_batches_tracked"
_WRAPPER_KEYS = ("state_dict", "model", "net")
_cache: dict[tuple, BiSeNet] = {}
_cache_lock = threading.Lock()


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` as a flat dict; :class:`ModelFileError` when unreadable or truncated."""
    if not os.path.isfile(path):
        raise ModelFileError(f"Face parsing weights not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelFileError(f"Face parsing weights file is empty (0 bytes): {path}. Download it again.")
    try:
        if path.lower().endswith((".safetensors", ".sft")):
            from safetensors.torch import load_file
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign format: all become one clear message
        raise ModelFileError(
            f"Could not read face parsing weights {path} ({size} bytes): {type(exc).__name__}: {exc}. "
            "The file is probably truncated or not a BiSeNet checkpoint (expected the 53.3 MB "
            "79999_iter.pth / face_parsing.pth, or a .safetensors conversion). Download it again.") from exc
    return _unwrap(state, path)


def _unwrap(state, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} does not contain a state dict (found {type(state).__name__}).")
    for key in _WRAPPER_KEYS:
        inner = state.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            state = inner
            break
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ModelFileError(f"{path}: entry '{non_tensors[0]}' is not a tensor; not a BiSeNet state dict.")
    return state


def check_layout(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointLayoutError` naming the first missing, unexpected or mis-shaped key."""
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    hint = ("Expected the zllrunning face-parsing.PyTorch BiSeNet(n_classes=19) layout "
            "(79999_iter.pth, ConsistentID's face_parsing.pth).")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key '{missing[0]}'" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected key '{unexpected[0]}'" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise CheckpointLayoutError(f"{source}: {'; '.join(parts)}. {hint}")
    for key, tensor in state.items():
        want = tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointLayoutError(
                f"{source}: key '{key}' has shape {list(tensor.shape)}, expected {list(want)}. {hint}")


def build_from_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> BiSeNet:
    """A BiSeNet in eval mode holding ``state`` (checked strictly, cast to float32 per tensor)."""
    classifier = state.get("conv_out.conv_out.weight")
    num_classes = int(classifier.shape[0]) if isinstance(classifier, torch.Tensor) and classifier.ndim == 4 else NUM_CLASSES
    if num_classes != NUM_CLASSES:
        raise CheckpointLayoutError(
            f"{source}: key 'conv_out.conv_out.weight' has {num_classes} classes; the region masks need the "
            f"{NUM_CLASSES}-class CelebAMask-HQ model (79999_iter.pth / face_parsing.pth).")
    model = BiSeNet(NUM_CLASSES)
    expected = model.state_dict()
    check_layout(state, expected, source)
    converted = {}
    for key, tensor in state.items():
        target = expected[key]
        if not (tensor.is_floating_point() or tensor.dtype == target.dtype):
            raise CheckpointLayoutError(f"{source}: key '{key}' has dtype {tensor.dtype}, expected {target.dtype}.")
        converted[key] = tensor.to(target.dtype)
    result = model.load_state_dict(converted, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith(_OPTIONAL_SUFFIX)]
    if leftover or result.unexpected_keys:  # check_layout makes this unreachable; keep the guarantee local
        raise CheckpointLayoutError(f"{source}: keys not consumed: {leftover or result.unexpected_keys}")
    return model.eval().requires_grad_(False)


def load_bisenet(path: str, use_cache: bool = True) -> BiSeNet:
    """Load a BiSeNet checkpoint on CPU (cached by path, size and modification time)."""
    path = os.path.realpath(path)
    stat = os.stat(path) if os.path.isfile(path) else None
    key = (path, stat.st_size, stat.st_mtime_ns) if stat else None
    if use_cache and key is not None:
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None:
            return cached
    model = build_from_state_dict(read_state_dict(path), source=os.path.basename(path))
    logger.info("Likeness: loaded face parser %s", path)
    if use_cache and key is not None:
        with _cache_lock:
            for old in [k for k in _cache if k[0] == path]:
                del _cache[old]  # a replaced file must not keep its stale weights alive
            _cache[key] = model
    return model


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def load_face_parser(choice: str, device: str = "auto"):
    """FACE_PARSER for a loader choice: the landmark fallback, a file name under
    ``models/likeness/parsing/``, or an absolute path."""
    from .parser import LANDMARKS_CHOICE, FaceParser, landmark_parser

    if choice == LANDMARKS_CHOICE:
        return landmark_parser()
    if os.path.isabs(choice):
        from ...host.paths import MODEL, resolve_user_path
        path = resolve_user_path(choice, MODEL, "face parser file")
    else:
        from ...host.folders import resolve
        try:
            path = resolve("likeness", choice, subfolder="parsing")
        except FileNotFoundError as exc:
            fetch = fetch_advice(fetch_ids(["likeness/parsing"], choice))
            raise ModelFileError(f"{exc} Put 79999_iter.pth (or face_parsing.pth) in models/likeness/parsing/, or "
                                 f"choose '{LANDMARKS_CHOICE}'. {fetch}".rstrip()) from exc
    return FaceParser(kind="bisenet", name=os.path.basename(path), model=load_bisenet(path), device=device)
