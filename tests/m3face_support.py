"""Tiny M3Face Muse (aMUSEd) folders for tests and headless example runs: real diffusers/transformers classes with
small configs and seeded random weights, written in the diffusers folder layout the Muse loader reads.

``write_tiny_muse(models_dir)`` writes the English variant (CLIPTextModelWithProjection + a byte-level CLIP BPE
tokenizer) and ``write_tiny_muse(models_dir, multilingual=True)`` the multilingual one (M-CLIP: XLM-R + linear
projection, a Unigram XLM-R tokenizer). Both tokenizers are built here from a few hundred symbols, offline.
The images are 32x32 (an 8x8 token grid, VQ downscale 4).
"""
from __future__ import annotations

import json
import os

import torch

MUSE_SUBFOLDER = os.path.join("likeness", "m3face")
TINY_MUSE_NAME = "tiny-muse"
TINY_ML_MUSE_NAME = "tiny-ml-muse"
TINY_RESOLUTION = 32
TINY_CODEBOOK = 64
TINY_MAX_TOKENS = 48
TEXT_WIDTH = 32
ML_POOLED_WIDTH = 24   # M-CLIP projects to another width than its XLM-R: the loader must take numDims


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the BPE vocabulary's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def write_clip_tokenizer(folder: str, max_length: int = TINY_MAX_TOKENS) -> int:
    """A CLIP BPE tokenizer (every byte, with and without the end-of-word mark, a few merges); returns its size."""
    alphabet = list(_bytes_to_unicode().values())
    merges = ["f a", "fa c", "fac e</w>", "l a", "n d", "m a", "r k"]
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab_list)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
                   **special}, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    return len(vocab_list)


def write_xlmr_tokenizer(folder: str, max_length: int = TINY_MAX_TOKENS) -> int:
    """An XLM-R style Unigram tokenizer (``tokenizer.json``): specials at XLM-R's ids, letters, a few words."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    words = ["▁face", "▁visage", "▁Gesicht", "▁viso", "▁cara", "▁la", "▁le", "▁mark", "▁seg"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -2.0) for w in words]
    pieces += [("▁", -3.0)] + [(c, -4.0) for c in letters + list("|.,éèüöä")] + [("<mask>", 0.0)]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=3, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Metaspace(replacement="▁")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                             special_tokens=[("<s>", 0), ("</s>", 2)])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": max_length, "bos_token": "<s>",
                   "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
                   "pad_token": "<pad>", "mask_token": "<mask>"}, f)
    return len(pieces)


def tiny_transformer_config(cond_embed_dim: int = TEXT_WIDTH, encoder_hidden_size: int = TEXT_WIDTH) -> dict:
    return dict(hidden_size=32, use_bias=False, cond_embed_dim=cond_embed_dim, micro_cond_encode_dim=4,
                micro_cond_embed_dim=20, encoder_hidden_size=encoder_hidden_size, vocab_size=TINY_CODEBOOK + 1,
                codebook_size=TINY_CODEBOOK, in_channels=16, block_out_channels=32, num_res_blocks=1, downsample=True,
                upsample=True, block_num_heads=2, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                sample_size=TINY_RESOLUTION // 4)


def tiny_vq_config() -> dict:
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
                norm_num_groups=8, latent_channels=4, num_vq_embeddings=TINY_CODEBOOK, sample_size=TINY_RESOLUTION,
                lookup_from_codebook=True, force_upcast=True, mid_block_add_attention=False)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_encoder(multilingual: bool, vocab_size: int):
    if multilingual:
        from likeness.techniques.m3face.mclip import MCLIPConfig, MCLIPTextEncoder

        config = MCLIPConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=TINY_MAX_TOKENS + 2, pad_token_id=1,
                             bos_token_id=0, eos_token_id=2, transformerDimensions=TEXT_WIDTH, numDims=ML_POOLED_WIDTH,
                             architectures=["MultilingualCLIP"])
        return MCLIPTextEncoder(config)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TINY_MAX_TOKENS, projection_dim=TEXT_WIDTH,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModelWithProjection(config)


def write_tiny_muse(models_dir: str, multilingual: bool = False, seed: int = 0, name: str | None = None) -> str:
    """Write a tiny aMUSEd folder to ``models_dir/likeness/m3face/<name>``; returns its path."""
    from diffusers import AmusedScheduler, UVit2DModel, VQModel

    name = name or (TINY_ML_MUSE_NAME if multilingual else TINY_MUSE_NAME)
    folder = os.path.join(models_dir, MUSE_SUBFOLDER, name)
    tokenizer_dir = os.path.join(folder, "tokenizer")
    vocab_size = write_xlmr_tokenizer(tokenizer_dir) if multilingual else write_clip_tokenizer(tokenizer_dir)
    text_encoder = _seeded(seed, lambda: _text_encoder(multilingual, vocab_size))
    pooled = ML_POOLED_WIDTH if multilingual else TEXT_WIDTH
    transformer = _seeded(seed + 1, lambda: UVit2DModel(**tiny_transformer_config(cond_embed_dim=pooled)))
    vqvae = _seeded(seed + 2, lambda: VQModel(**tiny_vq_config()))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    vqvae.save_pretrained(os.path.join(folder, "vqvae"))
    AmusedScheduler(mask_token_id=TINY_CODEBOOK).save_pretrained(os.path.join(folder, "scheduler"))
    encoder_entry = ["likeness", "MCLIPTextEncoder"] if multilingual else ["transformers", "CLIPTextModelWithProjection"]
    tokenizer_entry = ["transformers", "XLMRobertaTokenizer" if multilingual else "CLIPTokenizer"]
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "AmusedPipeline", "scheduler": ["diffusers", "AmusedScheduler"],
                   "text_encoder": encoder_entry, "tokenizer": tokenizer_entry,
                   "transformer": ["diffusers", "UVit2DModel"], "vqvae": ["diffusers", "VQModel"]}, f, indent=1)
    return folder
