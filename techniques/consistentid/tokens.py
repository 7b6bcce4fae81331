"""ConsistentID's facial prompt: region selection, the ``<|facial|>`` marked caption, and marker positions in
ComfyUI's tokenizer output.

Official behaviour reproduced here (JackAILab/ConsistentID ``functions.py`` / SD1.5 pipeline):

1. Regions (BiSeNet labels, ascending): ``Face`` (1), then the first present of each left/right pair (eye 4/5,
   ear 7/8), ``Nose`` (10), the first present lip (12/13): at most five, in the order face, eye, ear, nose, lip.
2. Caption (the LLaVA call is disabled upstream): ``FIXED_FACIAL_CAPTION``. A marker is put right after the first
   occurrence of each feature word whose region is present, and the caption is rebuilt from the marked clauses
   in the marker order face, ears, eyes, nose, mouth.
3. **Quirk kept on purpose:** region vectors are paired with the marked tokens by position, so with all five
   regions the eye crop lands on "ears" and the ear crop on "eyes". The released weights were trained with this
   pairing; :func:`mark_facial_caption` returns the regions in that (official) pairing order.
4. Prompt: ``prompt + "Detail:" + caption``; if that is longer than 77 tokens, ``"Detail:" + caption +
   " Caption:" + prompt``; a raw caption over 330 characters is dropped.
5. The fused token is the one *before* each marker (the feature word); markers are removed from the text.

ComfyUI's tokenizer has no special ``<|facial|>`` token: the marker becomes a few ordinary BPE tokens. So the
text is tokenised twice: once with spaced-out markers (to find them) and once without (the clean tokens that are
encoded). :func:`locate_facial_tokens` is a pure function over ``clip.tokenize()`` output (chunks of 77
``(token, weight)`` pairs), so it handles weighted text and prompts longer than one chunk the same way ComfyUI
does; it never re-chunks anything itself.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ...errors import InvalidInputError

FACIAL_MARKER = "<|facial|>"
FIXED_FACIAL_CAPTION = "The person has one face, one nose, two eyes, two ears, and one mouth."
# The SDXL pipeline's own template and joiner (pipline_StableDiffusionXL_ConsistentID.py) differ in two words.
FIXED_FACIAL_CAPTION_SDXL = "The person has one face, one nose, two eyes, two ears, and a mouth."
DETAIL = "Detail:"
DETAIL_SDXL = "; Detail:"
MAX_CAPTION_CHARS = 330
CHUNK_TOKENS = 77

# BiSeNet label -> region name (zllrunning / ConsistentID table); only these take part.
FACIAL_REGION_LABELS = {1: "Face", 4: "Left_Eye", 5: "Right_Eye", 7: "Left_Ear", 8: "Right_Ear", 10: "Nose",
                        12: "Upper_Lip", 13: "Lower_Lip"}
REGION_WORD = {"Face": "face", "Left_Eye": "eyes", "Right_Eye": "eyes", "Left_Ear": "ears", "Right_Ear": "ears",
               "Nose": "nose", "Upper_Lip": "mouth", "Lower_Lip": "mouth"}
MARKER_WORD_ORDER = ("face", "ears", "eyes", "nose", "mouth")
_CLAUSE_DELIMITERS = ",.;"


# --------------------------------------------------------------------------------------------------------------
# Regions and caption

def select_facial_regions(present_labels: Iterable[int]) -> list[str]:
    """Region names kept from the BiSeNet labels present in the parse, in the official (ascending label) order."""
    kept, words_taken = [], set()
    for label in sorted(set(int(v) for v in present_labels)):
        region = FACIAL_REGION_LABELS.get(label)
        if region is None or REGION_WORD[region] in words_taken:
            continue
        kept.append(region)
        words_taken.add(REGION_WORD[region])
    return kept


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(word)}\b")


def mark_facial_caption(caption: str, regions: Sequence[str]) -> tuple[str, list[str]]:
    """``(caption with <|facial|> markers, regions in pairing order)``.

    ``regions`` is the output of :func:`select_facial_regions` (region order). Feature words whose region is
    missing get no marker and their clause is left out; regions whose word is not in the caption are dropped.
    """
    unknown = [r for r in regions if r not in REGION_WORD]
    if unknown:
        raise InvalidInputError(f"unknown facial regions {unknown}; expected names from {sorted(REGION_WORD)}.")
    # Words and punctuation separated by single spaces; repeated feature words blanked (only the first is marked).
    pieces = re.findall(r"\b\w+\b|[.,;!?]", caption)
    seen = set()
    for i, piece in enumerate(pieces):
        lowered = piece.lower()
        if lowered in MARKER_WORD_ORDER:
            if lowered in seen:
                pieces[i] = ""
            seen.add(lowered)
    text = " ".join(pieces)

    wanted = [w for w in MARKER_WORD_ORDER if any(REGION_WORD[r] == w for r in regions)]
    found = []
    for word in wanted:
        marked, count = _word_pattern(word).subn(f"{word} <|{word}|>", text, count=1)
        if count:
            text = marked
            found.append(word)

    clauses = []
    for word in found:
        start = text.find(f"<|{word}|>")
        end = start + len(word) + 4
        while start > 0 and text[start - 1] not in _CLAUSE_DELIMITERS:
            start -= 1
        while end < len(text) and text[end] not in _CLAUSE_DELIMITERS:
            end += 1
        clause = text[start:end].strip()
        if clause:
            clauses.append(clause + ",")
            text = text[:start] + text[end:]
    marked_caption = " ".join(clauses)
    for word in MARKER_WORD_ORDER:
        marked_caption = marked_caption.replace(f"<|{word}|>", FACIAL_MARKER)
    return marked_caption, [r for r in regions if REGION_WORD[r] in found]


def assemble_facial_prompt(prompt: str, marked_caption: str, token_count: Callable[[str], int],
                           raw_caption: str = FIXED_FACIAL_CAPTION, detail: str = DETAIL) -> str:
    """The text ConsistentID encodes: caption after the prompt, or before it when that would exceed 77 tokens.

    ``token_count(text)`` counts like the official tokenizer: BOS + EOS + content, each marker one token
    (see :func:`official_token_count`). ``detail`` joins them (SD1.5 ``"Detail:"``, SDXL ``"; Detail:"``).
    """
    if len(raw_caption) > MAX_CAPTION_CHARS or not marked_caption:
        return prompt
    text = prompt + detail + marked_caption
    if token_count(text) > CHUNK_TOKENS:
        text = detail + marked_caption + " Caption:" + prompt
    return text


# --------------------------------------------------------------------------------------------------------------
# Marker positions in ComfyUI token chunks

def spaced_markers(text: str) -> str:
    """Isolate each marker with spaces so the BPE pre-tokeniser never glues it to neighbouring punctuation
    (``"face <|facial|>,"`` would otherwise yield a ``"|>,"`` piece). Whitespace is free in CLIP tokenisation."""
    return text.replace(FACIAL_MARKER, f" {FACIAL_MARKER} ")


def strip_markers(text: str) -> str:
    """The text without markers (the official ``prompt_text_only``): what is actually encoded."""
    return text.replace(FACIAL_MARKER, "")


def _same_token(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):   # textual-inversion embeddings
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b))
    return a == b


def _is_special(token, special_ids: set[int]) -> bool:
    return isinstance(token, int) and token in special_ids


def content_tokens(chunks: Sequence[Sequence[tuple]], special_ids: Iterable[int]) -> list[tuple[int, int, object]]:
    """``(chunk, index, token)`` of every non-special token (no BOS/EOS/padding), in order."""
    special = set(special_ids)
    return [(c, i, pair[0]) for c, chunk in enumerate(chunks) for i, pair in enumerate(chunk)
            if not _is_special(pair[0], special)]


def marker_token_ids(marker_chunks: Sequence[Sequence[tuple]], special_ids: Iterable[int]) -> tuple[int, ...]:
    """The marker's token ids from the tokenisation of the marker alone (``clip.tokenize(" <|facial|> ")``)."""
    ids = tuple(tok for _, _, tok in content_tokens(marker_chunks, special_ids))
    if not ids or not all(isinstance(t, int) for t in ids):
        raise InvalidInputError("the tokenizer produced no tokens for the <|facial|> marker.")
    return ids


def _marker_at(stream: list, i: int, marker_ids: Sequence[int]) -> bool:
    return bool(marker_ids) and i + len(marker_ids) <= len(stream) and all(
        _same_token(stream[i + j], marker_ids[j]) for j in range(len(marker_ids)))


def _remove_markers(stream: list, marker_ids: Sequence[int]) -> tuple[list, list[int]]:
    """Content stream without marker runs, and for each marker the index (in that stream) of the token before."""
    clean, marked = [], []
    i = 0
    while i < len(stream):
        if not _marker_at(stream, i, marker_ids):
            clean.append(stream[i])
            i += 1
            continue
        if not clean:
            raise InvalidInputError("a <|facial|> marker starts the prompt; it must follow the word it marks.")
        if marked and marked[-1] == len(clean) - 1:
            raise InvalidInputError("two <|facial|> markers follow the same word.")
        marked.append(len(clean) - 1)
        i += len(marker_ids)
    return clean, marked


def locate_facial_tokens(marked_chunks: Sequence[Sequence[tuple]], plain_chunks: Sequence[Sequence[tuple]],
                         marker_ids: Sequence[int], special_ids: Iterable[int]) -> list[tuple[int, int]]:
    """Positions ``(chunk, index)`` in ``plain_chunks`` of the tokens each marker follows, in sequence order.

    ``marked_chunks``: tokenisation of ``spaced_markers(text)``; ``plain_chunks``: of ``strip_markers(text)``
    (the tokens that get encoded); both as ``clip.tokenize()`` returns them for one text encoder (list of chunks
    of ``(token, weight)`` pairs). Raises InvalidInputError when the two do not carry the same words.
    """
    special = set(special_ids)
    marked_stream = [tok for _, _, tok in content_tokens(marked_chunks, special)]
    clean, marked = _remove_markers(marked_stream, list(marker_ids))
    plain = content_tokens(plain_chunks, special)
    if len(plain) != len(clean) or not all(_same_token(a, b[2]) for a, b in zip(clean, plain, strict=True)):
        raise InvalidInputError(
            "the prompt tokenises differently with and without its <|facial|> markers (a marker glued inside a "
            "word?); put each marker right after a whole word, separated by a space or punctuation.")
    return [(plain[m][0], plain[m][1]) for m in marked]


def flat_token_index(positions: Sequence[tuple[int, int]], chunk_length: int = CHUNK_TOKENS) -> list[int]:
    """``(chunk, index)`` -> row in the encoded conditioning ``[1, chunks * chunk_length, C]``."""
    return [c * chunk_length + i for c, i in positions]


def official_token_count(marked_chunks: Sequence[Sequence[tuple]], marker_ids: Sequence[int],
                         special_ids: Iterable[int]) -> int:
    """Length the official tokenizer would give (BOS + EOS + content, each marker a single special token)."""
    stream = [tok for _, _, tok in content_tokens(marked_chunks, special_ids)]
    clean, marked = _remove_markers(stream, list(marker_ids))
    return len(clean) + len(marked) + 2


# --------------------------------------------------------------------------------------------------------------
# With a ComfyUI CLIP object (duck-typed: only ``clip.tokenize(text)``; no comfy import)

@dataclass
class FacialPromptTokens:
    """The clean tokens to encode and where the fused feature words sit in them."""
    text: str                              # the marked text it came from
    tokens: dict                           # clip.tokenize(strip_markers(text)): pass to clip.encode_from_tokens
    positions: list[tuple[int, int]]       # (chunk, index) per marker, in sequence order
    chunk_length: int

    @property
    def flat_positions(self) -> list[int]:
        """Rows in the encoded conditioning ``[1, chunks * 77, C]``."""
        return flat_token_index(self.positions, self.chunk_length)


def _special_ids(clip, key: str) -> set:
    """BOS, EOS and padding ids: everything the tokenizer emits for an empty prompt."""
    return {pair[0] for chunk in clip.tokenize("")[key] for pair in chunk if isinstance(pair[0], int)}


def tokenize_facial_prompt(clip, text: str, key: str = "l") -> FacialPromptTokens:
    """Tokenise a ``<|facial|>``-marked prompt with ComfyUI's tokenizer. The positions are found on text encoder
    ``"l"`` (CLIP-L), as the official SDXL pipeline finds them on its first tokenizer; on SDXL they index the rows
    of the ``cat(CLIP-L, CLIP-G)`` conditioning, whose two token streams hold the same BPE tokens."""
    special = _special_ids(clip, key)
    marker_ids = marker_token_ids(clip.tokenize(spaced_markers(FACIAL_MARKER))[key], special)
    marked = clip.tokenize(spaced_markers(text))[key]
    plain = clip.tokenize(strip_markers(text))
    positions = locate_facial_tokens(marked, plain[key], marker_ids, special)
    return FacialPromptTokens(text, plain, positions, len(plain[key][0]))


def facial_prompt(clip, prompt: str, regions: Sequence[str], caption: str = FIXED_FACIAL_CAPTION,
                  key: str = "l", detail: str = DETAIL) -> tuple[str, list[str]]:
    """The official prompt assembly on ComfyUI's tokenizer: ``(marked text, regions in pairing order)``."""
    marked_caption, paired = mark_facial_caption(caption, regions)
    special = _special_ids(clip, key)
    marker_ids = marker_token_ids(clip.tokenize(spaced_markers(FACIAL_MARKER))[key], special)

    def count(text: str) -> int:
        return official_token_count(clip.tokenize(spaced_markers(text))[key], marker_ids, special)

    text = assemble_facial_prompt(prompt, marked_caption, count, caption, detail)
    return text, (paired if FACIAL_MARKER in text else [])
