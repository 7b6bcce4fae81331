"""FaceA-Net core (no ComfyUI): identity files, [feat] prompts, the attention LoRA, crop/mask/paste math."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from likeness.errors import IncompatibleEmbedsError, InvalidInputError, ModelFileError
from likeness.techniques.facea_net import inpaint, lora, prompt
from likeness.techniques.facea_net.identity import TASKS, Identity, load_identity, save_identity

# ------------------------------------------------------------------------------------------ helpers

class FakeClip:
    """Duck-typed stand-in for comfy.sd.CLIP: word ids like ComfyUI's tokenizer, a deterministic encoder."""

    def __init__(self, dim: int = 8):
        self.dim = dim
        self.encoded = 0

    def tokenize(self, text, return_word_ids=False):
        words = text.split()
        chunk = [(49406, 1.0, 0)] + [(1000 + sum(map(ord, w)), 1.0, i + 1) for i, w in enumerate(words)]
        chunk += [(49407, 1.0, 0)] * (77 - len(chunk))
        if not return_word_ids:
            chunk = [(t, w) for t, w, _ in chunk]
        return {"l": [chunk]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.encoded += 1
        ids = torch.tensor([[t[0] for t in chunk] for chunk in tokens["l"]], dtype=torch.float32)
        pos = torch.arange(ids.shape[1], dtype=torch.float32)
        freqs = torch.arange(1, self.dim + 1, dtype=torch.float32)
        cond = torch.sin(ids[..., None] * 1e-3 * freqs + pos[None, :, None] * 0.1).reshape(1, -1, self.dim)
        return (cond, torch.zeros(1, self.dim)) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens):
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]


def make_identity(dim=8, n=3, seed=0, **kw) -> Identity:
    g = torch.Generator().manual_seed(seed)
    feats = {t: torch.randn(n, dim, generator=g) for t in TASKS}
    return Identity(feats=feats, class_word=kw.pop("class_word", "man"), **kw)


class TinyAttn(torch.nn.Module):
    def __init__(self, dim, ctx):
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(ctx, dim, bias=False)
        self.to_v = torch.nn.Linear(ctx, dim, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out(attn @ v)


class TinyBlock(torch.nn.Module):
    def __init__(self, dim=16, ctx=8):
        super().__init__()
        self.proj_in = torch.nn.Linear(dim, dim)
        self.attn1 = TinyAttn(dim, dim)
        self.attn2 = TinyAttn(dim, ctx)
        self.ff = torch.nn.Linear(dim, dim)

    def forward(self, x, context):
        x = self.proj_in(x)
        x = x + self.attn1(x)
        x = x + self.attn2(x, context)
        return self.ff(x)


class TinyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.input_blocks = torch.nn.ModuleList([TinyBlock(), TinyBlock()])

    def forward(self, x, context):
        for block in self.input_blocks:
            x = block(x, context)
        return x


# ------------------------------------------------------------------------------------------ identity

def test_identity_file_round_trips(tmp_path):
    ident = make_identity(class_word="woman", lora_name="likeness/anna.safetensors", name="anna",
                          metadata={"rank": 48, "steps": 600, "attributes": ["nose"]},
                          reference_embedding=torch.randn(128), embedding_model_id="dlib:resnet_v1")
    path = save_identity(ident, str(tmp_path / "ids" / "anna.safetensors"))
    back = load_identity(path)
    assert back.class_word == "woman" and back.lora_name == "likeness/anna.safetensors" and back.name == "anna"
    assert back.metadata == {"rank": 48, "steps": 600, "attributes": ["nose"]}
    assert back.embedding_model_id == "dlib:resnet_v1"
    assert torch.equal(back.reference_embedding, ident.reference_embedding)
    assert back.tasks == TASKS
    for task in TASKS:
        assert torch.equal(back.feats[task], ident.feats[task])
    assert back.lora is None  # the LoRA lives in its own file


def test_identity_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ModelFileError, match="not a FaceA-Net identity"):
        load_identity(str(other))
    with pytest.raises(ModelFileError, match="not found"):
        load_identity(str(tmp_path / "missing.safetensors"))


def test_identity_validates_feats():
    with pytest.raises(InvalidInputError, match="Unknown identity task"):
        Identity(feats={"ear": torch.zeros(3, 8)})
    with pytest.raises(InvalidInputError, match="same width"):
        Identity(feats={"face": torch.zeros(3, 8), "nose": torch.zeros(3, 9)})


# ------------------------------------------------------------------------------------------ prompts

def test_feat_positions_follow_the_end_token():
    # BOS a man face EOS pad...
    word_ids = [0, 1, 2, 3] + [0] * 73
    assert prompt.feat_positions(word_ids, 3) == [5, 6, 7]
    with pytest.raises(InvalidInputError):
        prompt.feat_positions([0] * 77, 3)
    with pytest.raises(InvalidInputError, match="do not fit"):
        prompt.feat_positions([0] + [1] * 74 + [0, 0], 4)


def test_insert_feats_is_out_of_place_and_differentiable():
    cond = torch.randn(2, 77, 8)
    feats = torch.randn(3, 8, requires_grad=True)
    out = prompt.insert_feats(cond, [5, 6, 7], feats)
    assert torch.equal(out[:, 5:8], feats.detach().expand(2, -1, -1))
    assert torch.equal(out[:, :5], cond[:, :5]) and torch.equal(out[:, 8:], cond[:, 8:])
    out.sum().backward()
    assert torch.allclose(feats.grad, torch.full_like(feats, 2.0))
    with pytest.raises(IncompatibleEmbedsError):
        prompt.insert_feats(cond, [5, 6, 7], torch.randn(3, 9))


def test_identity_conditioning_concatenates_task_chunks():
    clip = FakeClip(dim=8)
    ident = make_identity(dim=8, n=3)
    cond = prompt.build_identity_conditioning(clip, ident, "a smiling face with glasses")
    assert len(cond) == 1
    tensor, extras = cond[0]
    assert tensor.shape == (1, 77 * 6, 8)
    assert "pooled_output" in extras
    plain = clip.encode_from_tokens(clip.tokenize("a smiling face with glasses"))
    assert torch.equal(tensor[:, :77], plain)  # T_id itself is untouched
    for k, task in enumerate(TASKS):
        chunk = tensor[:, 77 * (k + 1): 77 * (k + 2)]
        text = prompt.task_prompt("man", task)
        template = clip.encode_from_tokens(clip.tokenize(text))
        n_words = len(text.split())
        feat_at = list(range(n_words + 2, n_words + 5))
        assert torch.equal(chunk[0, feat_at], ident.feats[task])
        keep = [i for i in range(77) if i not in feat_at]
        assert torch.equal(chunk[0, keep], template[0, keep])
    only_face = prompt.build_identity_conditioning(clip, ident, "x", tasks=["face"])
    assert only_face[0][0].shape == (1, 154, 8)
    zero = prompt.build_identity_conditioning(clip, ident, "x", tasks=["face"], feat_strength=0.0)
    face_template = clip.encode_from_tokens(clip.tokenize(prompt.task_prompt("man", "face")))
    assert torch.allclose(zero[0][0][:, 77:], face_template)


def test_task_prompts_follow_the_paper():
    assert prompt.task_prompt("woman", "face") == "a woman face"
    assert prompt.task_prompt("man", "left_eye") == "a man left eye"


# ------------------------------------------------------------------------------------------ LoRA

def test_lora_targets_attention_projections_only():
    unet = TinyUNet()
    targets = lora.attention_targets(unet)
    assert sorted(targets) == sorted(f"input_blocks.{b}.attn{a}.{p}" for b in (0, 1) for a in (1, 2)
                                     for p in ("to_q", "to_k", "to_v", "to_out.0"))
    with pytest.raises(InvalidInputError):
        lora.attention_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_attached_lora_matches_merged_weights_and_restores_the_model():
    torch.manual_seed(0)
    unet = TinyUNet()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    before = unet(x, ctx)
    adapters = lora.IdentityLoRA.for_model(unet, rank=4, alpha=2.0, seed=1)
    with torch.no_grad():
        for _, a in adapters.items():
            a.up.normal_(0, 0.5)
    with adapters.attached(unet):
        patched = unet(x, ctx)
    assert not torch.allclose(patched, before)
    assert torch.equal(unet(x, ctx), before)  # restored exactly
    assert all("forward" not in m.__dict__ for m in unet.modules())
    # the stock loader computes W + alpha/r * up @ down: the same function
    merged = TinyUNet()
    merged.load_state_dict(unet.state_dict())
    with torch.no_grad():
        for name, a in adapters.items():
            lora.attention_targets(merged)[name].weight += a.delta_weight()
    assert torch.allclose(merged(x, ctx), patched, atol=1e-5)


def test_lora_restores_after_an_exception():
    unet = TinyUNet()
    adapters = lora.IdentityLoRA.for_model(unet, rank=2)
    with pytest.raises(RuntimeError):
        with adapters.attached(unet):
            raise RuntimeError("cancel")
    assert all("forward" not in m.__dict__ for m in unet.modules())


def test_native_state_dict_round_trips_and_is_attention_only():
    unet = TinyUNet()
    a = lora.IdentityLoRA.for_model(unet, rank=4, seed=3)
    with torch.no_grad():
        for _, ad in a.items():
            ad.up.normal_()
    state = a.native_state_dict()
    assert lora.native_keys_are_attention_only(state)
    assert "diffusion_model.input_blocks.0.attn2.to_out.0.lora_up.weight" in state
    assert state["diffusion_model.input_blocks.0.attn2.to_k.lora_down.weight"].shape == (4, 8)
    assert float(state["diffusion_model.input_blocks.0.attn2.to_k.alpha"]) == 4.0
    b = lora.IdentityLoRA.for_model(unet, rank=4, seed=99)
    b.load_native(state)
    for (_, x), (_, y) in zip(a.items(), b.items(), strict=True):
        assert torch.equal(x.up, y.up) and torch.equal(x.down, y.down)
    assert not lora.native_keys_are_attention_only({"diffusion_model.out.2.lora_up.weight": torch.zeros(1)})


def test_autograd_flows_through_inference_weights_without_copies():
    with torch.inference_mode():
        unet = TinyUNet()
        x, ctx = torch.randn(1, 3, 16), torch.randn(1, 4, 8)
    weight = unet.input_blocks[0].ff.weight
    assert weight.is_inference()
    with torch.inference_mode(False):
        adapters = lora.IdentityLoRA.for_model(unet, rank=2)
        with adapters.attached(unet), lora.autograd_safe_weights(unet):
            assert unet.input_blocks[0].ff.weight.data_ptr() == weight.data_ptr()
            unet(x.clone(), ctx.clone()).square().mean().backward()
    assert unet.input_blocks[0].ff.weight is weight  # swapped back
    assert all(ad.up.grad is not None for _, ad in adapters.items())


# ------------------------------------------------------------------------------------------ inpaint math

def test_crop_box_stays_inside_the_image_and_is_square():
    box = inpaint.crop_box([10, 10, 60, 70], (200, 300), context=2.0)
    assert box == (0, 0, 120, 120)
    box = inpaint.crop_box([250, 150, 290, 190], (200, 300), context=2.0)
    assert box[2] <= 300 and box[3] <= 200 and box[2] - box[0] == box[3] - box[1] == 80
    box = inpaint.crop_box([0, 0, 150, 150], (200, 300), context=2.0, square=True)
    assert box[3] - box[1] == 200 and box[2] - box[0] == 200
    assert inpaint.work_size_for((0, 0, 100, 50), 512) == (256, 512)


def test_paste_back_leaves_pixels_outside_the_feathered_mask_unchanged():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(300, 420, 3, generator=g)
    info = inpaint.make_crop_info([150, 80, 250, 190], (300, 420), context=2.0, working_size=128, square=True)
    region = inpaint.ellipse_mask(info.work_size, (64, 64), (30, 40))
    masks = inpaint.build_masks(region, grow=4, feather=8)
    assert masks.blend[:10].max() == 0 and masks.blend[:, -10:].max() == 0  # zero along the crop border
    generated = torch.rand(*info.work_size, 3, generator=g)
    out, full = inpaint.paste_back(image, generated, masks.blend, info)
    assert full.shape == (300, 420)
    outside = full < 1.0 / 255
    assert (out - image).abs()[outside].max() <= 1.0 / 255
    assert torch.equal(out[full == 0], image[full == 0])
    inside = full > 0.99
    assert inside.any() and (out - image).abs()[inside].mean() > 0.1
    # the feathered band blends smoothly
    band = (full > 0.2) & (full < 0.8)
    assert band.any()


def test_keypoint_masks_and_region_parsing():
    kps = np.array([[40, 50], [80, 50], [60, 70], [45, 90], [75, 90]], dtype=np.float32)
    masks = inpaint.keypoint_region_masks([20, 20, 100, 110], kps, (128, 128))
    assert set(masks) == set(TASKS)
    left = masks["left_eye"]
    ys, xs = torch.nonzero(left > 0.5, as_tuple=True)
    assert abs(float(xs.float().mean()) - 40) < 3  # left = the image's left
    assert float(masks["face"].sum()) > float(masks["mouth"].sum()) > 0
    assert inpaint.parse_regions("eyes, mouth") == ["left_eye", "right_eye", "mouth"]
    assert inpaint.parse_regions("Face") == ["face"]
    with pytest.raises(InvalidInputError):
        inpaint.parse_regions("ears")


def test_masked_pixels_match_comfyui_inpaint_preparation():
    crop = torch.rand(1, 16, 16, 3)
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:8, 4:8] = 1
    out = inpaint.masked_pixels(crop, mask)
    assert torch.allclose(out[:, 4:8, 4:8], torch.full((1, 4, 4, 3), 0.5))
    assert torch.equal(out[:, 8:], crop[:, 8:])


def test_latent_masks_and_batch_tasks():
    from likeness.techniques.facea_net.training import TrainSettings, latent_masks

    mask = torch.zeros(64, 64)
    mask[10:14, 20:23] = 1  # a tiny region rounds away at 8x8 but keeps its loss footprint
    model_in, loss = latent_masks(mask, (8, 8))
    assert model_in.shape == (1, 8, 8) and loss.sum() >= 1 and model_in.sum() >= 1
    settings = TrainSettings(class_word="man")
    assert settings.feat_tokens == 3 and TrainSettings(class_word="woman").feat_tokens == 4
    assert settings.tasks == TASKS
    local = TrainSettings(attributes=("nose",), local_only=True)
    assert local.tasks == ("nose",)
    with pytest.raises(InvalidInputError):
        TrainSettings(attributes=("ear",))


def test_batches_mix_the_global_and_local_tasks():
    from likeness.techniques.facea_net.identity import ATTRIBUTES
    from likeness.techniques.facea_net.training import IdentityTask, TrainSettings

    trainer = IdentityTask.__new__(IdentityTask)  # only the task sampler is exercised
    trainer.settings = TrainSettings()
    g = torch.Generator().manual_seed(0)
    tasks = trainer.batch_tasks(4, g)
    assert tasks[:2] == ["face", "face"] and all(t in ATTRIBUTES for t in tasks[2:])
    assert {trainer.batch_tasks(1, g)[0] == "face" for _ in range(30)} == {True, False}
    trainer.settings = TrainSettings(attributes=("nose",), local_only=True)
    assert trainer.batch_tasks(3, g) == ["nose"] * 3
    trainer.settings = TrainSettings(attributes=())
    assert trainer.batch_tasks(2, g) == ["face", "face"]


def test_train_settings_check_the_precision():
    from likeness.techniques.facea_net.training import TrainSettings

    assert TrainSettings().precision == "auto"
    assert TrainSettings(precision="fp32").precision == "fp32"
    with pytest.raises(InvalidInputError, match="precision must be one of auto, bf16, fp32"):
        TrainSettings(precision="fp16")
