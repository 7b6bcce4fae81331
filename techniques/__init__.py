"""Identity techniques: torch modules, checkpoint loaders and encode functions, one sub-package each.

Nothing here imports ComfyUI at module level; host-only helpers import it lazily inside functions.
"""
