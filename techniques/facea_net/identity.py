"""IDENTITY: what FaceA-Net learns about one person, and its safetensors file.

An identity holds one set of learned ``[feat]`` vectors per task (the whole face and each facial
attribute), the class word the prompts were trained with ("man", "woman", "person"), the name of its
LoRA file (ComfyUI's native LoRA format, loaded by the stock LoraLoader) and free-form metadata. After
training the LoRA tensors also ride along in memory (``lora``), so a graph can inpaint with a freshly
trained identity before anything is written to disk.

File layout (``models/likeness/identities/<name>.safetensors``): tensors ``feat.<task>`` ``[n, C]``
(float32) and optionally ``reference_embedding`` ``[D]``; safetensors metadata ``likeness.kind =
facea_net_identity``, ``likeness.version``, ``class_word``, ``lora_name``, ``meta`` (a JSON object).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import torch

from ...errors import InvalidInputError, ModelFileError
from ...safetensors_io import atomic_save

TASKS = ("face", "left_eye", "right_eye", "nose", "mouth")
ATTRIBUTES = TASKS[1:]
TASK_WORDS = {"face": "face", "left_eye": "left eye", "right_eye": "right eye", "nose": "nose", "mouth": "mouth"}
DEFAULT_FEAT_TOKENS = {"man": 3, "woman": 4, "person": 4}  # the paper: 3 for men, 4 for women
# the text-encoder width of each model family: an identity file without a recorded base still tells its family
FEAT_WIDTH_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl"}

FILE_KIND = "facea_net_identity"
FILE_VERSION = "1"


@dataclass
class Identity:
    """One person's learned FaceA-Net identity (the IDENTITY socket value)."""

    feats: dict[str, torch.Tensor]          # task -> [n, C] learned output embeddings
    class_word: str = "person"
    lora_name: str = ""                     # file under ComfyUI's loras folder ("" = not saved yet)
    metadata: dict = field(default_factory=dict)
    name: str = ""
    lora: dict[str, torch.Tensor] | None = None        # native-format LoRA state dict, when in memory
    reference_embedding: torch.Tensor | None = None    # [D] mean face embedding of the references
    embedding_model_id: str = ""                        # which face model made reference_embedding

    def __post_init__(self):
        validate_feats(self.feats)
        if not self.class_word.strip():
            raise InvalidInputError("The identity's class word is empty; use e.g. 'man', 'woman' or 'person'.")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in TASKS if t in self.feats)

    @property
    def embed_dim(self) -> int:
        return int(next(iter(self.feats.values())).shape[-1])

    def n_tokens(self, task: str) -> int:
        return int(self.feats[task].shape[0])

    @property
    def family(self) -> str:
        """The model family it was trained on (``sd15`` / ``sdxl`` ...: ``metadata["base"]``, else from the
        [feat] width; ``unknown`` when neither tells)."""
        return str(self.metadata.get("base") or FEAT_WIDTH_FAMILY.get(self.embed_dim, "unknown"))

    def detached(self) -> "Identity":
        """A copy whose tensors are plain (no autograd, not inference tensors) float32 CPU tensors."""
        def plain(t):
            return None if t is None else t.detach().to("cpu", torch.float32).clone()
        return replace(self, feats={k: plain(v) for k, v in self.feats.items()},
                       lora=None if self.lora is None else {k: plain(v) for k, v in self.lora.items()},
                       reference_embedding=plain(self.reference_embedding), metadata=dict(self.metadata))


def validate_feats(feats: dict[str, torch.Tensor]) -> None:
    if not feats:
        raise InvalidInputError("An identity needs [feat] embeddings for at least one task (e.g. 'face').")
    dims = set()
    for task, value in feats.items():
        if task not in TASKS:
            raise InvalidInputError(f"Unknown identity task '{task}'; expected one of {', '.join(TASKS)}.")
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] < 1:
            raise InvalidInputError(f"[feat] embeddings for '{task}' must be a [n, C] tensor with n >= 1, "
                                    f"got {getattr(value, 'shape', type(value))}.")
        dims.add(int(value.shape[1]))
    if len(dims) != 1:
        raise InvalidInputError(f"All [feat] embeddings of an identity must have the same width, got {sorted(dims)}.")


def save_identity(identity: Identity, path: str) -> str:
    """Write ``identity`` to ``path`` (a temporary file renamed into place) and return the path."""

    ident = identity.detached()
    tensors = {f"feat.{task}": ident.feats[task].contiguous() for task in ident.tasks}
    if ident.reference_embedding is not None:
        tensors["reference_embedding"] = ident.reference_embedding.reshape(-1).contiguous()
    meta = {
        "likeness.kind": FILE_KIND,
        "likeness.version": FILE_VERSION,
        "class_word": ident.class_word,
        "lora_name": ident.lora_name,
        "name": ident.name,
        "embedding_model_id": ident.embedding_model_id,
        "meta": json.dumps(ident.metadata, sort_keys=True, default=str),
    }
    return atomic_save(tensors, path, meta)


def load_identity(path: str) -> Identity:
    """Read an identity file written by :func:`save_identity`; the LoRA stays on disk (``lora_name``)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ModelFileError(f"Identity file not found: {path}. Train one with 'Train Identity (FaceA-Net)'.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ModelFileError(f"Identity file {path} is not a readable safetensors file ({exc}).") from exc
    if meta.get("likeness.kind") != FILE_KIND:
        raise ModelFileError(f"{path} is not a FaceA-Net identity file (kind={meta.get('likeness.kind')!r}). "
                             "Pick a file written by 'Train Identity (FaceA-Net)'.")
    feats = {k[len("feat."):]: v.float() for k, v in tensors.items() if k.startswith("feat.")}
    try:
        metadata = json.loads(meta.get("meta", "{}"))
    except json.JSONDecodeError:
        metadata = {}
    ref = tensors.get("reference_embedding")
    return Identity(feats=feats, class_word=meta.get("class_word", "person"), lora_name=meta.get("lora_name", ""),
                    metadata=metadata, name=meta.get("name", os.path.splitext(os.path.basename(path))[0]),
                    reference_embedding=None if ref is None else ref.float(),
                    embedding_model_id=meta.get("embedding_model_id", ""))
