"""Which inputs of a workflow ``eval`` sets per cell: the identity photo, the prompt, the seed(s), and
which node's images are the cell's results.

Why: ``eval`` runs the user's own workflow files unchanged except for these inputs, so the rule that
finds them must be predictable and fail loudly instead of silently evaluating the workflow's own photo.

Rules (an explicit ``--image-input/--prompt-input/--seed-input/--output-node`` replaces the rule):

- identity photo: the ``image`` input of the node titled ``Reference photo``; else of the workflow's
  only ``LoadImage``. It is set to the photo's absolute path (the command line may read any path).
- prompt: the ``text`` (or ``prompt``, or a String primitive's ``value``) input of the node titled
  ``Positive``; else the ``prompt`` of the only ``LikenessConsistentIDEncode`` (ConsistentID writes the
  prompt in its encode node).
- seed: the seed input of every sampler (``KSampler.seed``, ``KSamplerAdvanced/SamplerCustom/RandomNoise
  .noise_seed``, ``LikenessFaceAInpaint.seed``). Training seeds and Face Fusion's reference-noise seed
  belong to the method and stay as the workflow has them.
- results: the images of every ``SaveImage`` node.

The shipped example workflows follow these titles, so they run under ``eval`` as they are.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

from ..errors import InvalidInputError

IMAGE_TITLE, IMAGE_CLASS, IMAGE_INPUT = "Reference photo", "LoadImage", "image"
PROMPT_TITLE, TEXT_INPUTS = "Positive", ("text", "prompt", "value")  # value: a String (Multiline) primitive
PROMPT_CLASSES = {"LikenessConsistentIDEncode": "prompt"}
SEED_CLASSES = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "SamplerCustom": "noise_seed",
                "RandomNoise": "noise_seed", "LikenessFaceAInpaint": "seed"}
OUTPUT_CLASSES = ("SaveImage",)

InputRef = tuple[str, str]  # (node id, input name)


class BindingError(InvalidInputError):
    """The workflow lacks a node ``eval`` must set (photo, prompt, seed) or one it reads images from."""


@dataclass(frozen=True)
class Bindings:
    image: InputRef
    prompt: InputRef
    seeds: tuple[InputRef, ...]
    outputs: tuple[str, ...]


def _titled(prompt: dict, title: str) -> list[str]:
    return [nid for nid, node in prompt.items() if (node.get("_meta") or {}).get("title") == title]


def _of_class(prompt: dict, classes) -> list[str]:
    return sorted((nid for nid, node in prompt.items() if node.get("class_type") in classes), key=_id_order)


def _id_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def _one(matches: list[str], what: str, hint: str) -> str | None:
    if len(matches) > 1:
        raise BindingError(f"several nodes could take the {what} (#{', #'.join(matches)}); {hint}")
    return matches[0] if matches else None


def image_input(prompt: dict) -> InputRef:
    hint = f"title one Load Image node '{IMAGE_TITLE}' or pass --image-input NODE.INPUT."
    node = _one(_titled(prompt, IMAGE_TITLE), "identity photo", hint) or _one(
        _of_class(prompt, (IMAGE_CLASS,)), "identity photo", hint)
    if node is None:
        raise BindingError(f"the workflow has no input for the identity photo: {hint}")
    return node, IMAGE_INPUT


def prompt_input(prompt: dict) -> InputRef:
    hint = f"title the prompt's text node '{PROMPT_TITLE}' or pass --prompt-input NODE.INPUT."
    node = _one(_titled(prompt, PROMPT_TITLE), "prompt", hint)
    if node is not None:
        name = next((n for n in TEXT_INPUTS if n in prompt[node].get("inputs", {})), None)
        if name is None:
            raise BindingError(f"node #{node} '{PROMPT_TITLE}' has no text or prompt input; pass --prompt-input.")
        return node, name
    node = _one(_of_class(prompt, PROMPT_CLASSES), "prompt", hint)
    if node is None:
        raise BindingError(f"the workflow has no input for the prompt: {hint}")
    return node, PROMPT_CLASSES[prompt[node]["class_type"]]


def seed_inputs(prompt: dict) -> tuple[InputRef, ...]:
    nodes = _of_class(prompt, SEED_CLASSES)
    if not nodes:
        raise BindingError(f"the workflow has no sampler whose seed eval can set ({', '.join(SEED_CLASSES)}); "
                           f"pass --seed-input NODE.INPUT.")
    return tuple((nid, SEED_CLASSES[prompt[nid]["class_type"]]) for nid in nodes)


def output_nodes(prompt: dict) -> tuple[str, ...]:
    nodes = _of_class(prompt, OUTPUT_CLASSES)
    if not nodes:
        raise BindingError("the workflow saves no image: add a Save Image node after the generation or pass "
                           "--output-node NODE.")
    return tuple(nodes)


def resolve_bindings(prompt: dict, image: InputRef | None = None, text: InputRef | None = None,
                     seeds: Sequence[InputRef] = (), outputs: Sequence[str] = ()) -> Bindings:
    """The bindings of an API prompt: the explicit ones given (already resolved to node ids), else the rules."""
    return Bindings(image or image_input(prompt), text or prompt_input(prompt),
                    tuple(seeds) or seed_inputs(prompt), tuple(outputs) or output_nodes(prompt))


def bind(prompt: dict, bindings: Bindings, image_path: str, text: str, seed: int) -> dict:
    """A copy of ``prompt`` with the cell's photo, prompt and seed set."""
    bound = copy.deepcopy(prompt)
    for (node, name), value in [(bindings.image, image_path), (bindings.prompt, text),
                                *[(ref, seed) for ref in bindings.seeds]]:
        bound[node].setdefault("inputs", {})[name] = value
    return bound
