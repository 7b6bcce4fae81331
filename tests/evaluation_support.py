"""Tiny evaluation models for tests: a CLIP with text tower and a DINO ViT, built from transformers configs and
saved as the local folders the metrics load (``models/likeness/evaluation/<name>``), random weights.

The CLIP tokenizer is a real CLIP BPE tokenizer with a byte-level vocabulary and no merges (every character is
a token), so any prompt tokenizes without the 49408-token vocabulary.
"""
from __future__ import annotations

import os

import torch

TINY_CLIP = "tiny-clip"
TINY_DINO = "tiny-dino"


def _byte_characters() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: one printable character per byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _byte_vocabulary() -> dict[str, int]:
    characters = _byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def byte_level_clip_tokenizer():
    """A CLIP BPE tokenizer over the byte-level alphabet without merges (any text; ids below 514)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocabulary(), merges=[])


def write_tiny_clip(folder: str, seed: int = 0, hidden: int = 32, projection: int = 16, image_size: int = 32) -> str:
    """A CLIPModel (text + vision, 2 layers each) and its tokenizer saved in ``folder``."""
    from transformers import CLIPConfig, CLIPModel

    os.makedirs(folder, exist_ok=True)
    vocabulary = _byte_vocabulary()
    byte_level_clip_tokenizer().save_pretrained(folder)
    text = {"vocab_size": len(vocabulary), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": vocabulary["<|startoftext|>"], "eos_token_id": vocabulary["<|endoftext|>"],
            "pad_token_id": vocabulary["<|endoftext|>"]}
    vision = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": image_size, "patch_size": 8}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    model.save_pretrained(folder)
    return folder


def write_tiny_dino(folder: str, seed: int = 0, hidden: int = 32, image_size: int = 32) -> str:
    """A ViTModel shaped like DINO ViT-S/16 (patch 16 -> 8 here, 2 layers, no pooler) saved in ``folder``."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                       image_size=image_size, patch_size=8, qkv_bias=True,
                       initializer_range=0.5)   # wide random weights: embeddings that follow the input
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def write_tiny_evaluation_models(models_root: str) -> dict[str, str]:
    """Both tiny models under ``<models_root>/likeness/evaluation/``; returns {"clip": name, "dino": name}."""
    base = os.path.join(models_root, "likeness", "evaluation")
    write_tiny_clip(os.path.join(base, TINY_CLIP))
    write_tiny_dino(os.path.join(base, TINY_DINO))
    return {"clip": TINY_CLIP, "dino": TINY_DINO}


def full_size_clip_config(kind: str = "vit-b-16"):
    """openai/clip-vit-base-patch16 (``vit-b-16``) or clip-vit-large-patch14 (``vit-l-14``) configs."""
    from transformers import CLIPConfig

    if kind == "vit-l-14":
        return CLIPConfig(text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                       "num_hidden_layers": 12},
                          vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                         "num_hidden_layers": 24, "patch_size": 14, "image_size": 224},
                          projection_dim=768)
    return CLIPConfig(text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                                   "num_hidden_layers": 12},
                      vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                     "num_hidden_layers": 12, "patch_size": 16, "image_size": 224},
                      projection_dim=512)


def full_size_dino_config():
    """facebook/dino-vits16: ViT-S/16 (384 wide, 12 layers, 6 heads)."""
    from transformers import ViTConfig

    return ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                     image_size=224, patch_size=16, qkv_bias=True)
