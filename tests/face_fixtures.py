"""Shared helpers for the face analysis tests: temp model folders, packaged photos, tiny packs."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from onnx_face_models import write_tiny_insightface_pack


def use_models_dir(monkeypatch, root: str) -> str:
    """Point the pack's model folders at ``root`` (works with and without ComfyUI on the path)."""
    from likeness.host import folders

    def candidates(folder: str) -> list[str]:
        return [os.path.join(root, folders.FOLDERS.get(folder, (folder, None))[0])]

    monkeypatch.setattr(folders, "folder_candidates", candidates)
    return root


@pytest.fixture
def models_root(tmp_path, monkeypatch) -> str:
    return use_models_dir(monkeypatch, str(tmp_path / "models"))


@pytest.fixture
def tiny_pack(models_root) -> str:
    """A tiny buffalo_l-shaped pack named 'tiny' (detector with 9 outputs, recogniser, 106 landmarks, genderage)."""
    write_tiny_insightface_pack(os.path.join(models_root, "insightface", "models", "tiny"))
    return "tiny"


def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def insightface_t1() -> np.ndarray:
    import importlib.util

    import cv2

    spec = importlib.util.find_spec("insightface")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "images", "t1.jpg")
    return cv2.imread(path)[..., ::-1].copy()


def as_image(*arrays: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 arrays (same size) -> IMAGE [B,H,W,3] float."""
    return torch.from_numpy(np.stack(arrays)).float() / 255.0
