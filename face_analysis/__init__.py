"""Host-independent face analysis: detection, alignment, embeddings, landmarks, pose, parsing, similarity.

Nothing here imports ComfyUI. Images are float tensors ``[B,H,W,C]`` in 0..1 (ComfyUI's IMAGE
layout) or uint8 numpy arrays ``[H,W,3]`` RGB; every function says which it takes.
"""
