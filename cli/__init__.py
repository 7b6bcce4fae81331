"""Command line of the pack: ``python path/to/pack models list|verify|fetch|table`` and ``... run``.

The pack is imported as ``likeness`` without running its ``__init__`` (see ``_bootstrap.py``), so these
modules never import torch or ComfyUI: ``models`` commands start instantly and need nothing but the
Python standard library (plus PyYAML, a ComfyUI requirement, when an ``extra_model_paths.yaml`` is read).
``run`` reaches ComfyUI only through ``host/headless.py``.
"""
