"""Prompt sets for ``python <pack> eval``: built-in sets and prompt files.

Why: a likeness table is only comparable when every method is asked for the same pictures. The
built-in ``recontext`` set follows the kind of prompts ConsistentID and PhotoMaker evaluate with
(the person in new places, clothes, actions and styles), written anew for this pack; ``portrait`` is a
short set for quick checks. Prompts say "a person" so one set fits every identity.

A prompt file holds one prompt per line; blank lines and lines starting with ``#`` are skipped.
"""
from __future__ import annotations

import os

from ..errors import InvalidInputError

RECONTEXT = (
    "a photo of a person standing on a beach at sunset",
    "a photo of a person in a snowy forest, wearing a wool hat",
    "a photo of a person reading a book in a library",
    "a photo of a person riding a bicycle on a city street",
    "a photo of a person cooking in a bright kitchen",
    "a photo of a person wearing a black suit and tie, office background",
    "a photo of a person in a red raincoat under an umbrella, rainy night",
    "a photo of a person hiking on a mountain trail, backpack",
    "a photo of a person sitting in a cafe with a cup of coffee",
    "a photo of a person playing an acoustic guitar on a stage",
    "a photo of a person wearing sunglasses in a desert",
    "a photo of a person in a space suit on the moon",
    "a photo of a person holding a bouquet of flowers in a garden",
    "a photo of a person as a chef in a white uniform",
    "a close-up portrait of a person, studio lighting, grey background",
    "an oil painting of a person in the style of a renaissance portrait",
    "a watercolor painting of a person by a lake",
    "a pencil sketch of a person, black and white",
    "a photo of a person laughing with friends at a party",
    "a photo of a person in a knight's armor in a castle hall",
)

PORTRAIT = (
    "a close-up portrait of a person, natural light",
    "a photo of a person smiling, outdoors, shallow depth of field",
    "a photo of a person in a white shirt, plain background",
    "a photo of a person wearing glasses, indoor light",
)

BUILT_IN_SETS: dict[str, tuple[str, ...]] = {"recontext": RECONTEXT, "portrait": PORTRAIT}


class PromptSetError(InvalidInputError):
    """A prompt set name that is neither built in nor a readable file, or a file without prompts."""


def read_prompt_file(path: str) -> list[str]:
    """The prompts of a text file: one per line, without blank lines and ``#`` comments."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
    except OSError as exc:
        raise PromptSetError(f"prompt file '{path}' cannot be read: {exc.strerror or exc}.") from exc
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise PromptSetError(f"prompt file '{path}' holds no prompts (one per line; '#' starts a comment).")
    return prompts


def load_prompts(name_or_path: str) -> list[str]:
    """A built-in set by name (``recontext``, ``portrait``) or the prompts of a text file."""
    if name_or_path in BUILT_IN_SETS:
        return list(BUILT_IN_SETS[name_or_path])
    if os.path.isfile(name_or_path):
        return read_prompt_file(name_or_path)
    raise PromptSetError(f"'{name_or_path}' is neither a built-in prompt set ({', '.join(sorted(BUILT_IN_SETS))}) "
                         f"nor a prompt file.")
