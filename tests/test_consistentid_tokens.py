"""ConsistentID facial prompt: official caption marking, prompt assembly, and marker positions in ComfyUI-style
token chunks (plain, with a small stand-in tokenizer; host, with ComfyUI's real SD1 tokenizer)."""
from __future__ import annotations

import re

import pytest

from likeness.errors import InvalidInputError
from likeness.techniques.consistentid.tokens import (
    FACIAL_MARKER,
    FIXED_FACIAL_CAPTION,
    assemble_facial_prompt,
    facial_prompt,
    flat_token_index,
    locate_facial_tokens,
    mark_facial_caption,
    official_token_count,
    select_facial_regions,
    spaced_markers,
    strip_markers,
    tokenize_facial_prompt,
)

ALL_REGIONS = ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]
# What the official process_text_with_markers returns for the fixed caption (run on the official code).
OFFICIAL_MARKED = ("The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, "
                   "one nose <|facial|>, and one mouth <|facial|>,")


class StandInClip:
    """Mimics ``comfy.sd.CLIP.tokenize`` for SD1: ``{"l": [[(id, weight) x 77], ...]}``.

    Pieces are split like CLIP's pre-tokeniser (letter runs, digits, punctuation runs), so ``<|facial|>`` becomes
    three pieces; ``(text:1.2)`` sets weights; chunks hold BOS + 75 tokens + EOS, padded with EOS.
    """
    BOS, EOS = 49406, 49407

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def piece_id(self, piece: str) -> int:
        return self.vocab.setdefault(piece.lower(), 1000 + len(self.vocab))

    def tokenize(self, text: str) -> dict:
        weighted = []
        for match in re.finditer(r"\(([^()]*):([0-9.]+)\)|([^()]+)", text):
            segment, weight = (match[1], float(match[2])) if match[1] is not None else (match[3], 1.0)
            weighted += [(self.piece_id(p), weight) for p in re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]+", segment)]
        chunks = []
        for start in range(0, max(len(weighted), 1), 75):
            body = weighted[start:start + 75]
            chunk = [(self.BOS, 1.0)] + body + [(self.EOS, 1.0)]
            chunks.append(chunk + [(self.EOS, 1.0)] * (77 - len(chunk)))
        return {"l": chunks}

    def word_at(self, tokens: dict, position: tuple[int, int]) -> str:
        inverse = {v: k for k, v in self.vocab.items()}
        return inverse[tokens["l"][position[0]][position[1]][0]]


def test_caption_marking_matches_official_output():
    marked, paired = mark_facial_caption(FIXED_FACIAL_CAPTION, ALL_REGIONS)
    assert marked == OFFICIAL_MARKED
    assert paired == ALL_REGIONS        # eye crop pairs with "ears", ear crop with "eyes" (official quirk)
    marked, paired = mark_facial_caption(FIXED_FACIAL_CAPTION, ["Face", "Left_Eye", "Nose", "Upper_Lip"])
    assert marked == ("The person has one face <|facial|>, two eyes <|facial|>, one nose <|facial|>, "
                      "and one mouth <|facial|>,")
    assert paired == ["Face", "Left_Eye", "Nose", "Upper_Lip"]
    assert mark_facial_caption(FIXED_FACIAL_CAPTION, ["Face", "Nose"]) == (
        "The person has one face <|facial|>, one nose <|facial|>,", ["Face", "Nose"])
    assert mark_facial_caption(FIXED_FACIAL_CAPTION, []) == ("", [])


def test_region_selection_keeps_first_of_each_pair():
    assert select_facial_regions([0, 1, 2, 4, 5, 7, 8, 10, 11, 12, 13, 17]) == ALL_REGIONS
    assert select_facial_regions([1, 5, 8, 13]) == ["Face", "Right_Eye", "Right_Ear", "Lower_Lip"]
    assert select_facial_regions([0, 17, 16]) == []


def test_marker_positions_fixed_facial_prompt():
    clip = StandInClip()
    text = "a photo of a woman" + "Detail:" + OFFICIAL_MARKED
    marked = clip.tokenize(spaced_markers(text))["l"]
    plain = clip.tokenize(strip_markers(text))
    specials = {clip.BOS, clip.EOS}
    marker = [clip.piece_id("<|"), clip.piece_id("facial"), clip.piece_id("|>")]
    positions = locate_facial_tokens(marked, plain["l"], marker, specials)
    assert [clip.word_at(plain, p) for p in positions] == ["face", "ears", "eyes", "nose", "mouth"]
    assert all(chunk == 0 for chunk, _ in positions)
    assert FACIAL_MARKER not in strip_markers(text)


def test_marker_positions_beyond_the_first_chunk():
    clip = StandInClip()
    long_prompt = " ".join(f"word{i % 10} x" for i in range(45))    # 135 pieces: the caption starts in chunk 1
    text = "Detail:" + OFFICIAL_MARKED + " Caption:" + long_prompt + ", one face <|facial|>"
    plain = clip.tokenize(strip_markers(text))
    assert len(plain["l"]) == 3
    positions = locate_facial_tokens(clip.tokenize(spaced_markers(text))["l"], plain["l"],
                                     [clip.piece_id("<|"), clip.piece_id("facial"), clip.piece_id("|>")],
                                     {clip.BOS, clip.EOS})
    assert [clip.word_at(plain, p) for p in positions] == ["face", "ears", "eyes", "nose", "mouth", "face"]
    assert positions[-1][0] == 2
    flat = flat_token_index(positions)
    assert flat[-1] == 2 * 77 + positions[-1][1]


def test_marker_positions_with_weighted_text():
    clip = StandInClip()
    text = "(smiling:1.2) woman, (one face <|facial|>:1.3), two eyes <|facial|>, (red hat:0.8)"
    plain = clip.tokenize(strip_markers(text))
    positions = locate_facial_tokens(clip.tokenize(spaced_markers(text))["l"], plain["l"],
                                     [clip.piece_id("<|"), clip.piece_id("facial"), clip.piece_id("|>")],
                                     {clip.BOS, clip.EOS})
    assert [clip.word_at(plain, p) for p in positions] == ["face", "eyes"]
    assert [plain["l"][c][i][1] for c, i in positions] == [1.3, 1.0]   # weights travel with the tokens


def test_bad_marker_use_is_refused():
    clip = StandInClip()
    marker = [clip.piece_id("<|"), clip.piece_id("facial"), clip.piece_id("|>")]
    specials = {clip.BOS, clip.EOS}
    text = "<|facial|> starts the prompt"
    with pytest.raises(InvalidInputError, match="starts the prompt"):
        locate_facial_tokens(clip.tokenize(spaced_markers(text))["l"], clip.tokenize(strip_markers(text))["l"],
                             marker, specials)
    with pytest.raises(InvalidInputError, match="tokenises differently"):
        locate_facial_tokens(clip.tokenize("one face x")["l"], clip.tokenize("one face y")["l"], marker, specials)


def test_prompt_assembly_order_and_caption_limit():
    clip = StandInClip()
    marker = [clip.piece_id("<|"), clip.piece_id("facial"), clip.piece_id("|>")]

    def count(text):
        return official_token_count(clip.tokenize(spaced_markers(text))["l"], marker, {clip.BOS, clip.EOS})

    assert count("one face <|facial|>") == 2 + 2 + 1                   # BOS, one, face, marker, EOS
    short = assemble_facial_prompt("a woman", OFFICIAL_MARKED, count)
    assert short == "a woman" + "Detail:" + OFFICIAL_MARKED
    long_prompt = " ".join(["portrait"] * 60)
    assert assemble_facial_prompt(long_prompt, OFFICIAL_MARKED, count) == (
        "Detail:" + OFFICIAL_MARKED + " Caption:" + long_prompt)
    assert assemble_facial_prompt("a woman", OFFICIAL_MARKED, count, raw_caption="x" * 331) == "a woman"
    text, paired = facial_prompt(clip, "a woman", ALL_REGIONS)
    assert text == short and paired == ALL_REGIONS


@pytest.mark.host
def test_marker_positions_with_comfy_sd1_tokenizer(tiny_clip):
    """Real SD1 tokenizer: fixed facial prompt, a prompt over 77 tokens, weighted text."""
    tokenizer = tiny_clip.tokenizer.clip_l
    vocab_inverse = {v: k for k, v in tokenizer.tokenizer.get_vocab().items()}

    def words(result):
        return [vocab_inverse[result.tokens["l"][c][i][0]] for c, i in result.positions]

    text, paired = facial_prompt(tiny_clip, "a photo of a woman", ALL_REGIONS)
    assert text.endswith(OFFICIAL_MARKED) and paired == ALL_REGIONS
    result = tokenize_facial_prompt(tiny_clip, text)
    assert words(result) == ["face</w>", "ears</w>", "eyes</w>", "nose</w>", "mouth</w>"]
    assert result.tokens == tiny_clip.tokenize(strip_markers(text))

    long_prompt = ", ".join(["a very detailed cinematic portrait photograph"] * 12)
    text, _ = facial_prompt(tiny_clip, long_prompt, ALL_REGIONS)
    assert text.startswith("Detail:")                                  # official swap for > 77 tokens
    result = tokenize_facial_prompt(tiny_clip, text + ", and one face <|facial|>")
    assert len(result.tokens["l"]) > 1
    assert words(result) == ["face</w>", "ears</w>", "eyes</w>", "nose</w>", "mouth</w>", "face</w>"]
    assert result.positions[-1][0] >= 1 and result.flat_positions[-1] >= 77

    result = tokenize_facial_prompt(tiny_clip, "(smiling:1.2) woman, (one face <|facial|>:1.3), "
                                               "two eyes <|facial|>, (red hat:0.8)")
    assert words(result) == ["face</w>", "eyes</w>"]
    assert [result.tokens["l"][c][i][1] for c, i in result.positions] == [pytest.approx(1.3), 1.0]
    cond = tiny_clip.encode_from_tokens(result.tokens)
    assert cond.shape[1] == 77 * len(result.tokens["l"])
