"""FaceA-Net (AAAI 2025): attribute-driven identity LoRA with [feat] embeddings, and the face inpaint chain.

- :mod:`.identity`: the IDENTITY value and its safetensors file;
- :mod:`.prompt`: conditioning with [feat] vectors at the padding positions (T'_id);
- :mod:`.lora`: rank-r attention-only LoRA, ComfyUI-native export;
- :mod:`.inpaint`: crop with context, masks, feathered paste-back;
- :mod:`.training`: the trainer (global + local tasks) and attribute transfer.
"""
