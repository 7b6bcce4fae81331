"""Measurement nodes: Likeness Metrics (the papers' metrics on a batch, as a table and a contact sheet) and Save
Metrics (the rows as CSV / JSON in ComfyUI's output folder). The metrics live in ``evaluation/``."""
from __future__ import annotations

import logging
import os

from ..errors import InvalidInputError
from ..model_hints import ModelFolder
from ..validation import check_images, check_masks
from ._common import category, check_analyzer, file_choices, int_input
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("Evaluate")
NO_MODEL = "(none)"
METRICS_TYPE = "LIKENESS_METRICS"
EVALUATION_MODELS = ModelFolder("evaluation model folder (CLIP, DINO)", "likeness", ("evaluation",))
FORMATS = ("csv+json", "csv", "json")


def _model_choices() -> list[str]:
    from ..evaluation.encoders import list_model_folders

    return [NO_MODEL] + [name for name in file_choices(list_model_folders, NO_MODEL) if name != NO_MODEL]


def split_prompts(text: str, count: int) -> str | list[str] | None:
    """The prompt input: empty -> None; exactly ``count`` (> 1) non-empty lines -> one per image; else one prompt."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    if count > 1 and len(lines) == count:
        return lines
    return " ".join(lines)


class LikenessMetrics:
    NODE_ID = "LikenessMetrics"
    DISPLAY_NAME = "Likeness Metrics"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Measures generated images against the reference photo the way the papers do: FaceSim (ArcFace "
                   "from the connected insightface analyzer, dlib as an independent judge, a second recogniser), a "
                   "copy-paste check against a second real photo, CLIP-T / CLIP-I, DINO, FGIS, PSNR / SSIM on aligned "
                   "faces, change outside an inpainting mask and the identity-mixing balance. An image without a face "
                   "gets empty cells with the reason, not an error. Models come from models/likeness/evaluation/.")
    RETURN_TYPES = ("STRING", "IMAGE", METRICS_TYPE)
    RETURN_NAMES = ("table", "contact_sheet", "metrics")
    FUNCTION = "measure"

    @classmethod
    def INPUT_TYPES(cls):
        choices = _model_choices()
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The generated images."}),
            "references": ("IMAGE", {"tooltip": "The reference photo (used for every image) or one per image."}),
            "metrics": ("STRING", {"default": "auto", "tooltip": "auto: every metric whose model and inputs are "
                        "connected. Or names, comma separated: facesim_arcface, facesim_dlib, facesim_second, "
                        "copy_paste, clip_t, clip_i, dino, fgis, psnr_ssim, outside_mask, mixing."}),
            "clip_model": (choices, {"default": NO_MODEL, "tooltip": "A CLIP model with its text tower (transformers "
                           "folder in models/likeness/evaluation/, e.g. clip-vit-large-patch14): CLIP-T and CLIP-I."}),
            "dino_model": (choices, {"default": NO_MODEL, "tooltip": "DINO ViT-S/16 (transformers folder in "
                           "models/likeness/evaluation/, e.g. dino-vits16): DINO and FGIS."}),
            "dlib_judge": ("BOOLEAN", {"default": True, "tooltip": "Also judge with dlib's 128-D model, which no "
                           "generator uses (needs dlib and face-recognition-models)."}),
            "tile": int_input(256, 64, 1024, "Contact sheet tile size in pixels.", step=32),
        }, "optional": {
            "analyzer": ("FACE_ANALYZER", {"tooltip": "The insightface analyzer (ArcFace): facesim_arcface, and the "
                         "judge that finds and aligns faces."}),
            "second_analyzer": ("FACE_ANALYZER", {"tooltip": "Another recogniser (another insightface pack): "
                                "facesim_second."}),
            "parser": ("FACE_PARSER", {"tooltip": "Face parser for FGIS regions (default: landmark parser)."}),
            "second_photo": ("IMAGE", {"tooltip": "Another real photo of the same person: copy-paste check."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt (CLIP-T); one line per "
                       "image when there are exactly as many lines as images."}),
            "mask": ("MASK", {"tooltip": "The inpainting mask: change outside it (outside_mask)."}),
            "source": ("IMAGE", {"tooltip": "The image that was inpainted (default: the references)."}),
            "mix_sources": ("IMAGE", {"tooltip": "One photo per blended identity: the mixing balance."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, clip_model, dino_model):
        choices = _model_choices()
        for value in (clip_model, dino_model):
            if value != NO_MODEL and value not in choices:
                return EVALUATION_MODELS.missing_message(value)
        return True

    @shows_warnings
    def measure(self, images, references, metrics, clip_model, dino_model, dlib_judge, tile, analyzer=None,
                second_analyzer=None, parser=None, second_photo=None, prompt="", mask=None, source=None,
                mix_sources=None):
        from ..evaluation import compute_metrics, contact_sheet, format_table

        check_images(images=images, references=references, second_photo=second_photo, source=source,
                     mix_sources=mix_sources)
        check_masks(mask=mask)
        models = _models(clip_model, dino_model, dlib_judge, analyzer, second_analyzer, parser)
        chosen = None if metrics.strip().lower() in ("", "auto") else metrics
        rows = compute_metrics(images, references=references, second_photos=second_photo,
                               prompts=split_prompts(prompt, images.shape[0]), masks=mask, sources=source,
                               mix_sources=mix_sources, metrics=chosen, models=models)
        missing = [row["image"] for row in rows if row["notes"]]
        if missing:
            logger.warning("Likeness Metrics: some cells of image(s) %s could not be measured; the table says why.",
                           missing)
        table = {"rows": rows, "models": _describe(models)}
        return format_table(rows), contact_sheet(images, rows, tile=tile), table


def _models(clip_model, dino_model, dlib_judge, analyzer, second_analyzer, parser):
    from ..evaluation import MetricModels
    from ..evaluation.encoders import load_clip, load_dino

    arcface = check_analyzer(analyzer) if analyzer is not None else None
    dlib = None
    if arcface is not None and arcface.backend == "dlib":
        arcface, dlib = None, arcface          # a dlib analyzer connected as the analyzer is the dlib judge
    if dlib is None and dlib_judge:
        from ..face_analysis.analyzers.dlib_backend import load_dlib
        dlib = load_dlib()
    second = check_analyzer(second_analyzer, "second_analyzer") if second_analyzer is not None else None
    return MetricModels(arcface=arcface, dlib=dlib, second=second,
                        clip=load_clip(clip_model) if clip_model != NO_MODEL else None,
                        dino=load_dino(dino_model) if dino_model != NO_MODEL else None, parser=parser)


def _describe(models) -> dict[str, str]:
    described = {}
    for name in ("arcface", "dlib", "second"):
        analyzer = getattr(models, name)
        if analyzer is not None:
            described[name] = analyzer.model_id
    for name in ("clip", "dino"):
        encoder = getattr(models, name)
        if encoder is not None:
            described[name] = encoder.name
    return described


class SaveMetrics:
    NODE_ID = "LikenessSaveMetrics"
    DISPLAY_NAME = "Save Metrics"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Writes the Likeness Metrics rows as CSV and/or JSON into ComfyUI's output folder, next to the "
                   "images saved with the same file name prefix (name_00001_metrics.csv, numbered like Save Image).")
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "metrics": (METRICS_TYPE, {"tooltip": "From Likeness Metrics."}),
            "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "name or subfolder/name inside the "
                                "output folder (use Save Image's prefix to keep them together)."}),
            "format": (list(FORMATS), {"default": "csv+json", "tooltip": "CSV (a row per image, empty cells where "
                       "missing) and/or JSON (rows, per-column mean/std/count and the models used)."}),
        }}

    def save(self, metrics, filename_prefix, format):
        from ..evaluation import write_csv, write_json
        from ..host.folders import new_output_stem

        if not isinstance(metrics, dict) or "rows" not in metrics:
            raise InvalidInputError("'metrics' must come from the Likeness Metrics node.")
        stem = new_output_stem(filename_prefix, "metrics")
        written = []
        if "csv" in format:
            written.append(write_csv(metrics["rows"], stem + ".csv"))
        if "json" in format:
            written.append(write_json(metrics["rows"], stem + ".json", {"models": metrics.get("models", {})}))
        logger.info("Likeness: metrics saved to %s", ", ".join(written))
        return {"ui": {"text": [os.path.basename(path) for path in written]}}


NODE_CLASSES = [LikenessMetrics, SaveMetrics]
