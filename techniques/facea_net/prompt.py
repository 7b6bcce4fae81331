"""FaceA-Net prompts: [feat] vectors placed at the padding positions after the meaningful words.

The text encoder turns "a woman face" into 77 output vectors: start token, the words, the end token,
then padding. FaceA-Net (after HiPer) replaces the *output* vectors of the first ``n`` padding
positions after the end token with learned vectors, one set per task:

    T_face = "a <class> face [feat_face] x n",  T_v = "a <class> <attribute> [feat_v] x n".

At inference the user's face prompt T_id is extended at the embedding level: T'_id = T_id followed by
the 77-token chunk of T_face and of every T_v (ComfyUI's ConditioningConcat layout: chunks along the
sequence axis). The end token is kept intact because SD1 relies on it heavily.

Works with ComfyUI's CLIP object through its public methods (``tokenize(text, return_word_ids=True)``,
``encode_from_tokens``, ``encode_from_tokens_scheduled``); nothing here imports ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...attention_patches.sites import family_name
from ...errors import IncompatibleEmbedsError, InvalidInputError
from .identity import FEAT_WIDTH_FAMILY, TASK_WORDS, TASKS, Identity

CHUNK = 77


def task_prompt(class_word: str, task: str) -> str:
    """The fixed training prompt of a task: "a woman face", "a man left eye", ..."""
    if task not in TASK_WORDS:
        raise InvalidInputError(f"Unknown FaceA-Net task '{task}'; expected one of {', '.join(TASKS)}.")
    return f"a {class_word.strip()} {TASK_WORDS[task]}"


def feat_positions(word_ids: Sequence[int], n: int, chunk_len: int = CHUNK) -> list[int]:
    """Positions of ``n`` [feat] tokens: the padding slots right after the end token.

    ``word_ids`` are the tokenizer's per-position word indices (0 for start/end/padding tokens).
    """
    words = [i for i, w in enumerate(word_ids) if w]
    if not words:
        raise InvalidInputError("The prompt has no words to attach [feat] embeddings to.")
    start = words[-1] + 2  # skip the end-of-text token
    if n < 1 or start + n > chunk_len:
        raise InvalidInputError(f"{n} [feat] tokens do not fit after a prompt of {words[-1]} tokens "
                                f"(chunk of {chunk_len}); shorten the class word or use fewer tokens.")
    return list(range(start, start + n))


def insert_feats(cond: torch.Tensor, positions: Sequence[int], feats: torch.Tensor) -> torch.Tensor:
    """``cond`` [B, L, C] with the vectors at ``positions`` replaced by ``feats`` [n, C] (out of place,
    differentiable with respect to ``feats``)."""
    if feats.shape[0] != len(positions):
        raise InvalidInputError(f"{feats.shape[0]} [feat] vectors for {len(positions)} positions.")
    if feats.shape[-1] != cond.shape[-1]:
        raise IncompatibleEmbedsError(
            f"The identity's [feat] vectors are {feats.shape[-1]}-wide but this text encoder gives "
            f"{cond.shape[-1]}-wide embeddings. Use the CLIP of the model family the identity was trained with.")
    index = torch.as_tensor(list(positions), device=cond.device)
    out = cond.clone()
    out[:, index] = feats.to(device=cond.device, dtype=cond.dtype).unsqueeze(0).expand(cond.shape[0], -1, -1)
    return out


def _first_chunk_word_ids(tokens_with_ids: dict) -> list[int]:
    first = next(iter(tokens_with_ids.values()))
    return [int(t[2]) if len(t) > 2 else 0 for t in first[0]]


def _strip_word_ids(tokens_with_ids: dict) -> dict:
    return {key: [[(t[0], t[1]) for t in chunk] for chunk in chunks] for key, chunks in tokens_with_ids.items()}


@dataclass
class TaskTemplate:
    """The encoded fixed prompt of one task and where its [feat] vectors go."""

    task: str
    text: str
    cond: torch.Tensor          # [1, 77, C] text-encoder output without feats
    positions: list[int]
    pooled: torch.Tensor | None = None   # [1, P] the encoder's pooled output (SDXL's y needs it)

    def with_feats(self, feats: torch.Tensor) -> torch.Tensor:
        return insert_feats(self.cond, self.positions, feats)


def encode_task_template(clip, class_word: str, task: str, n_tokens: int) -> TaskTemplate:
    """Encode ``task_prompt(class_word, task)`` with ComfyUI's CLIP and locate its [feat] slots."""
    text = task_prompt(class_word, task)
    tokens = clip.tokenize(text, return_word_ids=True)
    positions = feat_positions(_first_chunk_word_ids(tokens), n_tokens)
    cond, pooled = clip.encode_from_tokens(_strip_word_ids(tokens), return_pooled=True)
    if cond.shape[1] != CHUNK:
        raise InvalidInputError(f"Task prompt '{text}' encoded to {cond.shape[1]} tokens, expected {CHUNK}.")
    return TaskTemplate(task=task, text=text, cond=cond, positions=positions,
                        pooled=None if pooled is None else pooled.detach().reshape(1, -1))


def identity_chunks(clip, identity: Identity, tasks: Sequence[str] | None = None) -> torch.Tensor:
    """[1, 77 * len(tasks), C]: every task prompt of the identity with its [feat] vectors in place."""
    tasks = [t for t in (tasks or identity.tasks) if t in identity.feats]
    if not tasks:
        raise InvalidInputError(f"The identity has none of the requested tasks; it has {', '.join(identity.tasks)}.")
    templates = [encode_task_template(clip, identity.class_word, t, identity.n_tokens(t)) for t in tasks]
    width = int(templates[0].cond.shape[-1])
    if width != identity.embed_dim:   # e.g. an SD1.5 identity with SDXL's CLIP: name both families
        raise IncompatibleEmbedsError(
            f"The identity '{identity.name or 'just trained'}' was trained on {family_name(identity.family)} "
            f"([feat] vectors {identity.embed_dim} wide) but this text encoder is "
            f"{family_name(FEAT_WIDTH_FAMILY.get(width, 'unknown'))}'s ({width} wide); use the CLIP of the "
            f"checkpoint the identity was trained on.")
    return torch.cat([t.with_feats(identity.feats[t.task]) for t in templates], dim=1)


def build_identity_conditioning(clip, identity: Identity, text: str, tasks: Sequence[str] | None = None,
                                feat_strength: float = 1.0) -> list:
    """CONDITIONING for T'_id: ``text`` (T_id) followed by the identity's task chunks.

    ``feat_strength`` scales the identity chunks' deviation from the plain task prompts (1 = as trained,
    0 = the plain prompts without [feat] vectors).
    """
    base = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    extra = identity_chunks(clip, identity, tasks)
    if feat_strength != 1.0:
        plain = torch.cat([encode_task_template(clip, identity.class_word, t, identity.n_tokens(t)).cond
                           for t in (tasks or identity.tasks) if t in identity.feats], dim=1)
        extra = plain + (extra - plain) * feat_strength
    out = []
    for cond, extras in base:
        if cond.shape[-1] != extra.shape[-1]:
            raise IncompatibleEmbedsError(f"Text embeddings of width {cond.shape[-1]} cannot be joined with "
                                          f"identity chunks of width {extra.shape[-1]}.")
        joined = torch.cat([cond, extra.to(cond).expand(cond.shape[0], -1, -1)], dim=1)
        out.append([joined, dict(extras)])
    return out
