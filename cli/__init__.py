"""Command line of the pack: ``python path/to/pack models list|verify|fetch|table`` and ``... run``.

The pack is imported as ``likeness`` without running its ``__init__`` (see ``_bootstrap.py``), so these
modules never import torch or ComfyUI: ``models`` commands start instantly and work with nothing but
the Python standard library installed.
"""
