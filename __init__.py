"""Likeness: identity-preserving portrait nodes for ComfyUI.

ComfyUI imports this file as a custom-node package. It registers the pack's model folders, logs one
line naming any missing optional package, and exports the classic (V1) node mappings. It never
imports optional packages and never downloads anything.
"""
import logging

from .deps import log_unavailable_once
from .host.folders import register_model_folders
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__version__ = "0.1.0"

register_model_folders()
log_unavailable_once()
logging.getLogger("likeness").debug("Likeness %s: %d nodes", __version__, len(NODE_CLASS_MAPPINGS))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
