"""ConsistentID (JackAILab, MIT) on top of the shared FaceID-family machinery in ``techniques.faceid``.

- ``facial_encoder``: FacialEncoder (one-query region resampler + fuse module), official key names.
- ``loader``: ConsistentID files through the shared FaceID-family loader.
- ``tokens``: facial regions, the <|facial|> caption, marker positions in ComfyUI token chunks.
- ``encode``: reference face -> patched MODEL + positive (plain, then fused) / negative CONDITIONING.
"""
