"""Face parsing: BiSeNet (19 CelebAMask-HQ classes) or landmark polygons -> labels -> region masks.

- :mod:`.bisenet`: the network, key-compatible with ``79999_iter.pth`` / ``face_parsing.pth``;
- :mod:`.loader`: strict checkpoint loading (pickle with ``weights_only=True`` or safetensors), cached;
- :mod:`.parser`: FACE_PARSER, per-face crop -> batched inference -> paste back; :func:`face_regions`;
- :mod:`.regions`: label names, region sets, grow/feather, the CelebAMask-HQ colour map;
- :mod:`.landmark_fallback`: label maps from 68/106 landmarks or 5 keypoints (no weights needed).
"""
from .parser import LANDMARKS_CHOICE, FaceParser, ParseResult, RegionResult, face_regions, landmark_parser, parse_faces
from .regions import LABELS, PALETTE, REGION_NAMES, REGIONS

__all__ = ["LANDMARKS_CHOICE", "FaceParser", "ParseResult", "RegionResult", "face_regions", "landmark_parser",
           "parse_faces", "LABELS", "PALETTE", "REGION_NAMES", "REGIONS"]
