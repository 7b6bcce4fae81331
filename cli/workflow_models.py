"""Which model files one workflow needs, and whether each is there: ``models verify --for WORKFLOW.json``.

The workflow is read as the editor saves it (UI format, converted with :mod:`.ui_workflow`) or in API format.
The file widgets of the loader nodes known below (ComfyUI's core loaders and this pack's) give the files it
needs; each is matched to a ``models_manifest.json`` entry by folder and file name. A file that a trainer node
of the same workflow writes (Train Face Fusion's adapter, a FaceA-Net identity) is that node's output, not
something to download.

Standard library only, like the other ``models`` commands (no torch, no ComfyUI): the widget order of each
known node type is declared in :data:`NODE_FILES`; tests check it against the real node classes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .manifest import ModelEntry, ModelsLocation, read_json, split_folder
from .ui_workflow import WorkflowFormatError, is_api_format, is_ui_format, node_id_key, ui_to_api

FILE, PACK = "file", "pack"
STEM = "{}"
SAFETENSORS = ".safetensors"
LANDMARKS_CHOICE = "landmarks (no weights)"  # the face parser's weight-free choice (face_analysis/parsing)
VAE_BUILTINS = ("pixel_space", "taesd", "taesdxl", "taesd3", "taef1")  # VAELoader choices that are no single file
NO_EVALUATION_MODEL = "(none)"  # the metrics node's choice for a metric model left out (nodes/metrics.py)


@dataclass(frozen=True)
class FileWidget:
    """A widget whose value names a model file (or, for ``PACK``, a folder of files) under ``models/<folder>``."""
    folder: str
    kind: str = FILE
    not_files: tuple[str, ...] = ()  # choices that name no file


@dataclass(frozen=True)
class NodeFiles:
    """What one node type reads and writes. ``widgets``: its widgets in the editor's order, up to the last one
    used here (UI files store widget values by position)."""
    title: str
    widgets: tuple[str, ...]
    reads: Mapping[str, FileWidget] = field(default_factory=dict)
    name_widget: str = ""            # a trainer's output name ...
    writes: tuple[str, ...] = ()     # ... and the files it writes, relative to models/, STEM where the name goes


def _loader(title: str, folder: str, *widgets: str, not_files: tuple[str, ...] = ()) -> NodeFiles:
    """A loader whose first widget is the file and whose other named widgets are files of the same folder."""
    return NodeFiles(title, widgets, {w: FileWidget(folder, not_files=not_files) for w in widgets})


def _trainer(title: str, widgets: tuple[str, ...], *writes: str) -> NodeFiles:
    return NodeFiles(title, widgets, name_widget=widgets[-1], writes=writes)


IDENTITY_WRITES = ("likeness/identities/" + STEM + SAFETENSORS, "loras/likeness/" + STEM + SAFETENSORS)

NODE_FILES: dict[str, NodeFiles] = {
    # ComfyUI core loaders (nodes.py, comfy_extras)
    "CheckpointLoaderSimple": _loader("Load Checkpoint", "checkpoints", "ckpt_name"),
    "ImageOnlyCheckpointLoader": _loader("Image Only Checkpoint Loader", "checkpoints", "ckpt_name"),
    "unCLIPCheckpointLoader": _loader("unCLIP Checkpoint Loader", "checkpoints", "ckpt_name"),
    "VAELoader": _loader("Load VAE", "vae", "vae_name", not_files=VAE_BUILTINS),
    "LoraLoader": _loader("Load LoRA", "loras", "lora_name"),
    "LoraLoaderModelOnly": _loader("LoraLoaderModelOnly", "loras", "lora_name"),
    "CLIPVisionLoader": _loader("Load CLIP Vision", "clip_vision", "clip_name"),
    "ControlNetLoader": _loader("Load ControlNet Model", "controlnet", "control_net_name"),
    "DiffControlNetLoader": _loader("Load ControlNet Model (diff)", "controlnet", "control_net_name"),
    "UNETLoader": _loader("Load Diffusion Model", "diffusion_models", "unet_name"),
    "CLIPLoader": _loader("Load CLIP", "text_encoders", "clip_name"),
    "DualCLIPLoader": _loader("DualCLIPLoader", "text_encoders", "clip_name1", "clip_name2"),
    "UpscaleModelLoader": _loader("Load Upscale Model", "upscale_models", "model_name"),
    "StyleModelLoader": _loader("Load Style Model", "style_models", "style_model_name"),
    "GLIGENLoader": _loader("GLIGENLoader", "gligen", "gligen_name"),
    "HypernetworkLoader": _loader("HypernetworkLoader", "hypernetworks", "hypernetwork_name"),
    # this pack's loaders (nodes/)
    "LikenessConsistentIDLoader": _loader("ConsistentID Loader", "likeness/consistentid", "model_name"),
    "LikenessFaceIDLoader": _loader("FaceID / Face-MakeUp Loader", "likeness", "model_name"),  # "faceid/x.bin"
    "LikenessFusionAdapterLoader": _loader("Fusion Adapter Loader", "likeness/fusion", "adapter_name"),
    "LikenessFaceParserLoader": _loader("Face Parser Loader", "likeness/parsing", "parser",
                                        not_files=(LANDMARKS_CHOICE,)),
    "LikenessInsightFaceLoader": NodeFiles("Face Analyzer (insightface)", ("pack",),
                                           {"pack": FileWidget("insightface/models", PACK)}),
    "LikenessFaceALoadIdentity": _loader("Load Identity (FaceA-Net)", "likeness/identities", "identity"),
    "LikenessLoadFaceEmbeds": _loader("Load Face Embeds", "likeness/embeds", "file"),
    "LikenessPulidFluxLoader": _loader("PuLID-FLUX Loader", "pulid", "pulid_file"),
    "LikenessEvaClipLoader": _loader("EVA-CLIP Loader (PuLID-FLUX)", "clip_vision", "eva_file"),
    "LikenessLoadPulidFluxEmbeds": _loader("Load PuLID-FLUX Embeds", "likeness/pulid_embeds", "file"),
    "LikenessM3FaceControlNetLoader": _loader("M3Face FaceControlNet Loader", "controlnet", "control_net_name"),
    "LikenessM3FaceAltDiffusionLoader": NodeFiles("M3Face AltDiffusion Loader", ("folder",),  # a diffusers folder
                                                  {"folder": FileWidget("likeness/m3face", PACK)}),
    "LikenessM3FaceMuseLoader": NodeFiles("M3Face Muse Loader", ("model",),  # a diffusers aMUSEd folder
                                          {"model": FileWidget("likeness/m3face", PACK)}),
    "LikenessMetrics": NodeFiles("Likeness Metrics", ("metrics", "clip_model", "dino_model"), {
        w: FileWidget("likeness/evaluation", PACK, not_files=(NO_EVALUATION_MODEL,)) for w in ("clip_model", "dino_model")}),
    # this pack's nodes that write model files
    "LikenessTrainFaceFusion": _trainer("Train Face Fusion", ("name",), "likeness/fusion/" + STEM + SAFETENSORS),
    "LikenessTrainConsistentID": _trainer("Train ConsistentID", ("name",),
                                          "likeness/consistentid/" + STEM + SAFETENSORS),
    "LikenessFaceATrainIdentity": _trainer("Train Identity (FaceA-Net)", ("class_word", "name"), *IDENTITY_WRITES),
    "LikenessFaceAAttributeTransfer": _trainer("Attribute Transfer (FaceA-Net)", ("attributes", "name"),
                                               *IDENTITY_WRITES),
    "LikenessSaveFaceEmbeds": _trainer("Save Face Embeds", ("name",), "likeness/embeds/" + STEM + SAFETENSORS),
    "LikenessSavePulidFluxEmbeds": _trainer("Save PuLID-FLUX Embeds", ("name",),
                                            "likeness/pulid_embeds/" + STEM + SAFETENSORS),
    "LikenessM3FaceLoadImagicEmbedding": _loader("M3Face Load Imagic Embedding", "likeness/m3face_imagic",
                                                 "embedding_name"),
    "LikenessM3FaceImagicTrain": _trainer("M3Face Imagic Train", ("name",), "likeness/m3face_imagic/" + STEM
                                          + SAFETENSORS, "loras/likeness/m3face_imagic_" + STEM + SAFETENSORS),
}

# States of a needed file
PRESENT, MISSING, CORRUPT, MADE, UNLISTED_PRESENT, UNLISTED_MISSING, NOT_CHOSEN = (
    "present", "missing", "corrupt", "made", "unlisted present", "unlisted missing", "not chosen")
SATISFIED = {PRESENT, MADE, UNLISTED_PRESENT}


@dataclass
class NeededFile:
    """One model file the workflow reads: ``folder`` (under models/) and the widget's ``value``."""
    folder: str
    value: str
    kind: str
    nodes: list[str] = field(default_factory=list)  # "#4 Face Analyzer (insightface)"

    @property
    def relative(self) -> str:
        return f"{self.folder}/{self.value.replace(os.sep, '/')}"

    @property
    def is_placeholder(self) -> bool:
        """The dropdown's "(no file in ...)" entry, saved when the folder was empty."""
        return self.value.startswith("(") and self.value.endswith(")")


@dataclass
class WrittenFile:
    relative: str  # under models/
    node: str      # "#3 Train Face Fusion"


# --------------------------------------------------------------------------------------------------
# Reading the workflow


def _spec_class(node_type: str, spec: NodeFiles) -> type:
    """A stand-in node class with the widgets the converter needs to map ``widgets_values``."""
    inputs = {name: ("STRING", {}) for name in spec.widgets}
    return type(node_type, (), {"INPUT_TYPES": staticmethod(lambda: {"required": inputs}),
                                "DISPLAY_NAME": spec.title})


def load_prompt(path: str) -> tuple[dict, str]:
    """The workflow at ``path`` as an API prompt restricted to the node types in :data:`NODE_FILES`, and its
    format ("UI" or "API"); WorkflowFormatError when it is not a workflow."""
    workflow = read_json(path, WorkflowFormatError, "workflow file")
    if isinstance(workflow, dict) and is_ui_format(workflow):
        classes = {name: _spec_class(name, spec) for name, spec in NODE_FILES.items()}
        return ui_to_api(workflow, classes, skip_unknown=True), "UI"
    if isinstance(workflow, dict) and is_api_format(workflow):
        return workflow, "API"
    raise WorkflowFormatError(f"'{path}' is not a ComfyUI workflow (neither the editor's format nor API format).")


def _node_label(node_id: str, node: dict, spec: NodeFiles) -> str:
    title = (node.get("_meta") or {}).get("title") or spec.title
    return f"#{node_id} {title}"


def workflow_files(prompt: dict) -> tuple[list[NeededFile], list[WrittenFile]]:
    """The model files the prompt's known nodes read (one per folder and value) and the files its trainers write.

    Inputs fed by a link are skipped: their value is only known when the workflow runs."""
    needed: dict[tuple[str, str], NeededFile] = {}
    written: list[WrittenFile] = []
    for node_id in sorted(prompt, key=node_id_key):
        node = prompt[node_id]
        spec = NODE_FILES.get(node.get("class_type"))
        if spec is None:
            continue
        inputs, label = node.get("inputs") or {}, _node_label(node_id, node, spec)
        for name, widget in spec.reads.items():
            value = inputs.get(name)
            if isinstance(value, str) and value and value not in widget.not_files:
                item = needed.setdefault((widget.folder, value), NeededFile(widget.folder, value, widget.kind))
                item.nodes.append(label)
        stem = inputs.get(spec.name_widget) if spec.name_widget else None
        if isinstance(stem, str) and stem.strip():
            stem = stem.strip()
            stem = stem[: -len(SAFETENSORS)] if stem.lower().endswith(SAFETENSORS) else stem
            written += [WrittenFile(template.replace(STEM, stem), label) for template in spec.writes]
    return list(needed.values()), written


# --------------------------------------------------------------------------------------------------
# Matching to the manifest and to the disk


def normalized(relative: str) -> str:
    """``relative`` (under models/) with ComfyUI's legacy folder keys renamed, for comparisons."""
    key, sub = split_folder(relative.replace("\\", "/"))
    return "/".join(part for part in (key, sub) if part).lower()


def manifest_entry(entries: Iterable[ModelEntry], needed: NeededFile) -> ModelEntry | None:
    """The entry that installs ``needed``: same folder (or one below it, as ComfyUI lists folders recursively)
    and file name; for a pack, the archive entry installed into exactly that folder."""
    wanted = normalized(needed.relative)
    directory, name = wanted.rpartition("/")[0], wanted.rpartition("/")[2]
    for entry in entries:
        for folder in (normalized(f) for f in (entry.folder, *entry.alt_folders)):
            if needed.kind == PACK:
                if entry.is_archive and wanted == folder:
                    return entry
            elif not entry.is_archive and name == entry.filename.lower() and (
                    directory == folder or directory.startswith(folder + "/")):
                return entry
    return None


def folder_entries(entries: Iterable[ModelEntry], needed: NeededFile) -> list[ModelEntry]:
    """For a folder (``PACK``) the manifest lists file by file (a diffusers folder: ``unet/config.json``, ...):
    the entries installed into it or below it; empty for a file or a folder no entry names."""
    if needed.kind != PACK:
        return []
    wanted = normalized(needed.relative)
    return [entry for entry in entries if not entry.is_archive and any(
        folder == wanted or folder.startswith(wanted + "/")
        for folder in (normalized(f) for f in (entry.folder, *entry.alt_folders)))]


def maker(written: Iterable[WrittenFile], needed: NeededFile) -> WrittenFile | None:
    """The trainer output of this workflow that is ``needed``, if any."""
    wanted = normalized(needed.relative)
    return next((w for w in written if normalized(w.relative) == wanted), None)


def makers_of_folder(folder: str) -> list[str]:
    """Titles of the node types that write files into ``folder`` (for a file the manifest cannot give)."""
    folder = normalized(folder)
    return [spec.title for spec in NODE_FILES.values()
            if any(normalized(os.path.dirname(t)) == folder for t in spec.writes)]


def find_on_disk(location: ModelsLocation, needed: NeededFile) -> tuple[str | None, list[str]]:
    """Where ``needed`` (a file not in the manifest) is, searching every folder ComfyUI searches; and those paths."""
    key, sub = split_folder(needed.folder)
    tried = []
    for base in location.search_dirs(key):
        path = os.path.normpath(os.path.join(base, *filter(None, sub.split("/")), *needed.value.split("/")))
        tried.append(path)
        if (os.path.isdir(path) if needed.kind == PACK else os.path.isfile(path)):
            return path, tried
    return None, tried
