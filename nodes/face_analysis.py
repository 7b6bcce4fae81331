"""Face analysis nodes: analyzer loaders, Analyze, Align / Paste Back, identity embeds, similarity."""
from __future__ import annotations

import logging

from ..errors import InvalidInputError, ModelFileError
from ..model_hints import ModelFolder
from ..validation import check_images, check_masks
from ._common import (
    category,
    check_analyzer,
    checked_file_stem,
    file_choices,
    file_stamp,
    float_input,
    int_input,
    resolved_path,
)
from ._feedback import shows_warnings

logger = logging.getLogger("likeness")

CATEGORY = category("Face")
NO_PACK = "(no pack found in models/insightface/models)"
INSIGHTFACE_PACKS = ModelFolder("insightface model pack", "insightface", ("models",))
NO_EMBEDS = "(none saved yet)"
SAVED_EMBEDS = ModelFolder("saved face embeds", "likeness", ("embeds",), other_way=(
    "Save some with the Save Face Embeds node."))


def _check_faces(faces, name: str = "faces"):
    from ..face_analysis.types import FaceAnalysis

    if not isinstance(faces, FaceAnalysis):
        raise InvalidInputError(f"'{name}' must be FACES from the Analyze Faces node, got {type(faces).__name__}.")
    return faces


class InsightFaceAnalyzerLoader:
    NODE_ID = "LikenessInsightFaceLoader"
    DISPLAY_NAME = "Face Analyzer (insightface)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads an insightface model pack (antelopev2, buffalo_l, ...) from models/insightface/models/<pack>/ "
                   "without ever downloading. Only the detector and recogniser are loaded (plus landmark models when "
                   "asked), and the ONNX sessions are reused across runs.")
    RETURN_TYPES = ("FACE_ANALYZER",)
    RETURN_NAMES = ("analyzer",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..face_analysis.analyzers.insightface_backend import LANDMARK_CHOICES, PROVIDER_CHOICES, list_packs

        packs = file_choices(list_packs, NO_PACK)
        default = "antelopev2" if "antelopev2" in packs else packs[0]
        return {"required": {
            "pack": (packs, {"default": default, "tooltip": "Folder under models/insightface/models/ holding the pack's "
                             ".onnx files (e.g. antelopev2/scrfd_10g_bnkps.onnx, glintr100.onnx)."}),
            "provider": (list(PROVIDER_CHOICES), {"default": "auto", "tooltip": "ONNX Runtime device. auto = CUDA "
                         "when PyTorch sees a GPU, else CPU. An unavailable choice falls back to CPU."}),
            "landmarks": (list(LANDMARK_CHOICES), {"default": "none", "tooltip": "Also load the dense landmark models "
                          "(2d106det: 106 points; 1k3d68: 68 points + head pose). Needed for 106/68 pose maps."}),
            "det_size": int_input(640, 160, 2048, "Detector input size in pixels (square). 640 is the standard; "
                                  "Analyze retries at 480 and 320 when nothing is found.", step=32),
            "det_threshold": float_input(0.5, 0.05, 0.99, 0.01, "Minimum detector confidence for a face."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, pack):
        """Instead of ComfyUI's bare "Value not in list": what is wrong with the pack folder and how to get one."""
        from ..face_analysis.analyzers.insightface_backend import resolve_pack

        if pack == NO_PACK:
            return INSIGHTFACE_PACKS.missing_message()
        try:
            resolve_pack(pack)
        except ModelFileError as exc:
            return str(exc)
        return True

    def load(self, pack, provider, landmarks, det_size, det_threshold):
        from ..face_analysis.analyzers.insightface_backend import EXPECTED_TREE, load_insightface, pack_roots

        if pack == NO_PACK:
            raise ModelFileError(INSIGHTFACE_PACKS.missing_message() + "\n" + EXPECTED_TREE.format(root=pack_roots()[0]))
        return (load_insightface(pack, provider, landmarks, det_size=det_size, det_thresh=det_threshold),)


class DlibFaceAnalyzerLoader:
    NODE_ID = "LikenessDlibFaceLoader"
    DISPLAY_NAME = "Face Analyzer (dlib)"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads dlib's offline face models (HOG or MMOD detector, 68/5-point landmarks, 128-D ResNet identity "
                   "embedding) from the face-recognition-models package. No insightface needed; commercial-friendly.")
    RETURN_TYPES = ("FACE_ANALYZER",)
    RETURN_NAMES = ("analyzer",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "detector": (["HOG", "MMOD"], {"default": "HOG", "tooltip": "HOG: fast, frontal faces. MMOD: a CNN, finds "
                         "turned faces too but takes seconds per image on CPU."}),
            "landmarks": (["68", "5"], {"default": "68", "tooltip": "68: accurate keypoints and dense landmarks. 5: "
                          "faster; mouth corners are estimated."}),
            "jitters": int_input(0, 0, 16, "Extra randomly jittered crops averaged into each embedding (slower, "
                                 "slightly more stable)."),
            "det_size": int_input(1600, 320, 4096, "Images with a longer side are downscaled to this for detection "
                                  "(HOG time grows with pixels).", step=32),
            "upsample": int_input(0, 0, 2, "Upsample the image this many times before detecting: finds faces smaller "
                                  "than ~80 px, but can add false faces."),
        }}

    def load(self, detector, landmarks, jitters, det_size, upsample):
        from ..face_analysis.analyzers.dlib_backend import load_dlib

        return (load_dlib(detector, landmarks, jitters, det_size, upsample),)


class AnalyzeFaces:
    NODE_ID = "LikenessAnalyzeFaces"
    DISPLAY_NAME = "Analyze Faces"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Finds the faces in every image of the batch, picks the largest / the n-th / all / the one most "
                   "like a reference, and computes keypoints, landmarks and identity embeddings (FACES). The preview "
                   "numbers every face left to right; selected faces are green.")
    RETURN_TYPES = ("FACES", "IMAGE", "INT")
    RETURN_NAMES = ("faces", "preview", "face_count")
    FUNCTION = "analyze"

    @classmethod
    def INPUT_TYPES(cls):
        from ..face_analysis.analyze import NO_FACE_MODES, SELECTIONS

        return {"required": {
            "analyzer": ("FACE_ANALYZER", {"tooltip": "From a Face Analyzer loader."}),
            "image": ("IMAGE", {"tooltip": "One image or a batch."}),
            "selection": (list(SELECTIONS), {"default": "largest", "tooltip": "Which faces to keep per image: largest "
                          "box, the face numbered face_index (left to right, see the preview), all, or the one most "
                          "similar to the reference embeds."}),
            "face_index": int_input(0, 0, 64, "Used by selection 'index': 0 is the leftmost face."),
            "on_no_face": (list(NO_FACE_MODES), {"default": "error", "tooltip": "An image without a usable face: "
                           "error (names the image), skip it downstream, or pass it through unchanged."}),
            "retry": ("BOOLEAN", {"default": True, "tooltip": "When nothing is found, retry at smaller detector sizes "
                      "and on a padded image (tight crops)."}),
        }, "optional": {
            "reference": ("FACE_EMBEDS", {"tooltip": "For selection 'most_similar': the identity to look for."}),
        }}

    @shows_warnings
    def analyze(self, analyzer, image, selection, face_index, on_no_face, retry, reference=None):
        from ..face_analysis.analyze import analyze, draw_preview

        check_images(image=image)
        check_analyzer(analyzer)
        result = analyze(analyzer, image, selection=selection, face_index=face_index, reference=reference,
                         on_no_face=on_no_face, retry=retry)
        for note in result.faces.notes:   # e.g. "image 1: no face detected" with on_no_face skip / pass_through
            logger.warning("Likeness Analyze Faces: %s", note)
        return (result.faces, draw_preview(result), len(result.faces.all_faces()))


class AlignFaces:
    NODE_ID = "LikenessAlignFaces"
    DISPLAY_NAME = "Align Faces"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Crops every face of FACES upright with the ArcFace 5-point template (what ArcFace, FaceID-Plus and "
                   "Face-MakeUp use: 224 for CLIP encoders, 112 for ArcFace). The faces output carries the transforms "
                   "for Paste Faces Back.")
    RETURN_TYPES = ("IMAGE", "FACES")
    RETURN_NAMES = ("crops", "faces")
    FUNCTION = "align"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "faces": ("FACES", {"tooltip": "From Analyze Faces, computed on this image."}),
            "image": ("IMAGE", {"tooltip": "The image batch that was analysed."}),
            "size": (["112", "224", "256", "512"], {"default": "224", "tooltip": "Crop size in pixels."}),
            "crop_scale": float_input(1.0, 0.5, 3.0, 0.05, "Zoom out (>1: more hair and background) or in (<1)."),
        }}

    def align(self, faces, image, size, crop_scale):
        from dataclasses import replace

        import torch

        from ..face_analysis.align import align_faces

        check_images(image=image)
        faces = _check_faces(faces)
        aligned = align_faces(image, faces, int(size), crop_scale)
        crops = aligned.crops
        if crops.shape[0] == 0:   # every image skipped: one black crop keeps downstream nodes running
            crops = torch.zeros((1, int(size), int(size), 3))
        return (crops, replace(faces, alignment=aligned))


class PasteFacesBack:
    NODE_ID = "LikenessPasteFacesBack"
    DISPLAY_NAME = "Paste Faces Back"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Warps (edited) aligned crops back into the original image with a feathered edge, using the "
                   "transforms Align Faces kept. Crops may have been resized (e.g. by a face restorer).")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "paste"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image the faces were aligned from."}),
            "faces": ("FACES", {"tooltip": "The faces output of Align Faces."}),
            "crops": ("IMAGE", {"tooltip": "The crops to paste, in Align Faces' order, any square size."}),
            "feather": int_input(8, 0, 128, "Soft edge width in crop pixels."),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Where to paste: crop-sized (one per crop or one for all) or image-sized."}),
        }}

    def paste(self, image, faces, crops, feather, mask=None):
        from ..face_analysis.align import AlignedFaces, paste_back

        check_images(image=image, crops=crops)
        check_masks(mask=mask)
        faces = _check_faces(faces)
        if not isinstance(faces.alignment, AlignedFaces):
            raise InvalidInputError("'faces' carries no alignment: connect the faces output of Align Faces.")
        return (paste_back(image, faces.alignment, crops, mask, feather),)


class FaceEmbedsFromFaces:
    NODE_ID = "LikenessFaceEmbedsFromFaces"
    DISPLAY_NAME = "Face Embeds from Faces"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Collects the identity embeddings of every face in FACES into FACE_EMBEDS (one row per face), "
                   "tagged with the model that made them so different models are never mixed.")
    RETURN_TYPES = ("FACE_EMBEDS", "INT")
    RETURN_NAMES = ("embeds", "count")
    FUNCTION = "collect"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"faces": ("FACES", {"tooltip": "From Analyze Faces."})}}

    def collect(self, faces):
        from ..face_analysis.embeds import embeds_from_faces

        embeds = embeds_from_faces(_check_faces(faces))
        return (embeds, embeds.count)


class CombineFaceEmbeds:
    NODE_ID = "LikenessCombineFaceEmbeds"
    DISPLAY_NAME = "Combine Face Embeds"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Stacks FACE_EMBEDS of the same model and reduces them to one identity vector: mean, normalized "
                   "mean (recommended), element-wise median, or normalized mean after dropping outlier photos.")
    RETURN_TYPES = ("FACE_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        from ..face_analysis.embeds import COMBINE_METHODS

        return {"required": {
            "embeds": ("FACE_EMBEDS", {"tooltip": "Embeddings to combine."}),
            "method": (list(COMBINE_METHODS), {"default": "normalized_mean", "tooltip": "How to reduce to one vector."}),
            "outlier_threshold": float_input(2.5, 0.5, 10.0, 0.1, "outlier_rejection: drop photos whose similarity to "
                                             "the mean is this many robust deviations below the median."),
        }, "optional": {
            "embeds_2": ("FACE_EMBEDS", {"tooltip": "More embeddings of the same model."}),
            "embeds_3": ("FACE_EMBEDS", {"tooltip": "More embeddings of the same model."}),
            "embeds_4": ("FACE_EMBEDS", {"tooltip": "More embeddings of the same model."}),
        }}

    def combine(self, embeds, method, outlier_threshold, embeds_2=None, embeds_3=None, embeds_4=None):
        from ..face_analysis.embeds import combine, concat

        return (combine(concat([embeds, embeds_2, embeds_3, embeds_4]), method, outlier_threshold),)


class SaveFaceEmbeds:
    NODE_ID = "LikenessSaveFaceEmbeds"
    DISPLAY_NAME = "Save Face Embeds"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves FACE_EMBEDS as a safetensors file (with backend, model and size in its metadata) into "
                   "models/likeness/embeds/, to reuse an identity without its photos.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeds": ("FACE_EMBEDS", {"tooltip": "Embeddings to save."}),
            "name": ("STRING", {"default": "identity", "tooltip": "File name (without .safetensors): letters, "
                     "digits, space, . _ -."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name; otherwise "
                          "a number is appended."}),
        }}

    def save(self, embeds, name, overwrite):
        from ..face_analysis.embeds import EMBEDS_FILE_NAMES, embeds_path, save_embeds
        from ..host.folders import save_dir

        folder = save_dir("likeness", "embeds")
        stem = checked_file_stem(name, "name", [(folder, file_name) for file_name in EMBEDS_FILE_NAMES])
        path = embeds_path(folder, stem, overwrite)
        save_embeds(embeds, path)
        return {"ui": {"text": [path]}, "result": (path,)}


class LoadFaceEmbeds:
    NODE_ID = "LikenessLoadFaceEmbeds"
    DISPLAY_NAME = "Load Face Embeds"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads FACE_EMBEDS saved by Save Face Embeds from models/likeness/embeds/."
    RETURN_TYPES = ("FACE_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (_saved_embeds(), {"tooltip": "A file in models/likeness/embeds/."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, file):
        return SAVED_EMBEDS.choice_problem(file, _saved_embeds(), NO_EMBEDS)

    @classmethod
    def IS_CHANGED(cls, file):
        from ..host.folders import resolve

        return file_stamp(resolve, "likeness", file, "embeds")

    def load(self, file):
        from ..face_analysis.embeds import load_embeds
        from ..host.folders import resolve

        if file == NO_EMBEDS:
            raise ModelFileError(SAVED_EMBEDS.missing_message())
        return (load_embeds(resolved_path(resolve, "likeness", file, "embeds")),)


def _saved_embeds() -> list[str]:
    from ..host.folders import list_files

    return file_choices(lambda: list_files("likeness", "embeds", {".safetensors"}), NO_EMBEDS)


class FaceSimilarity:
    NODE_ID = "LikenessFaceSimilarity"
    DISPLAY_NAME = "Face Identity Similarity"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Scores how much the faces in a batch of images look like a reference identity (FaceSim): per "
                   "image the best-matching face's cosine similarity and L2 distance, pass/fail against the "
                   "backend's threshold, and an annotated image.")
    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT", "BOOLEAN")
    RETURN_NAMES = ("annotated", "report", "mean_cosine", "all_passed")
    FUNCTION = "compare"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "analyzer": ("FACE_ANALYZER", {"tooltip": "The analyzer that made the reference embeddings."}),
            "image": ("IMAGE", {"tooltip": "Images to check (e.g. generated portraits)."}),
            "threshold": float_input(0.0, 0.0, 2.0, 0.01, "Pass threshold; 0 = the backend's default (insightface: "
                                     "cosine >= 0.30, dlib: L2 < 0.6)."),
        }, "optional": {
            "reference_faces": ("FACES", {"tooltip": "Reference identity as analysed faces."}),
            "reference_embeds": ("FACE_EMBEDS", {"tooltip": "Reference identity as embeddings."}),
        }}

    def compare(self, analyzer, image, threshold, reference_faces=None, reference_embeds=None):
        from ..face_analysis.embeds import concat, embeds_from_faces
        from ..face_analysis.similarity import compare_images

        check_images(image=image)
        check_analyzer(analyzer)
        references = []
        if reference_faces is not None:
            references.append(embeds_from_faces(_check_faces(reference_faces, "reference_faces")))
        if reference_embeds is not None:
            references.append(reference_embeds)
        if not references:
            raise InvalidInputError("connect reference_faces or reference_embeds (the identity to compare with).")
        report, annotated, _ = compare_images(analyzer, image, concat(references), threshold or None)
        mean = report.mean_cosine
        text = report.to_text()
        return {"ui": {"text": [text]},
                "result": (annotated, text, 0.0 if mean != mean else mean, report.all_passed)}


NODE_CLASSES = [InsightFaceAnalyzerLoader, DlibFaceAnalyzerLoader, AnalyzeFaces, AlignFaces, PasteFacesBack,
                FaceEmbedsFromFaces, CombineFaceEmbeds, SaveFaceEmbeds, LoadFaceEmbeds, FaceSimilarity]
