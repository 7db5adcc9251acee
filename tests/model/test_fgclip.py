"""Video FG-CLIP: temperatures, loading policy, save/load, temporal head, dense and region features."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_tiny import CAPTIONS, TINY
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from fgclip.config import LN_100, HealthConfig, ModelConfig
from fgclip.model.fgclip import (
    FGCLIPVideoModel,
    LogitScaleMismatch,
    OldModelFormatError,
    load_clip,
    stretch_position_embeddings,
    tiny_clip_config,
)
from fgclip.model.losses import FGCLIPLoss
from fgclip.model.memory_bank import RegionFeatures
from fgclip.model.roi_align import roi_align
from fgclip.model.tokenizer import build_tokenizer, tokenize

LOGGER = "fgclip.model.fgclip"
SCRATCH = 2.6592  # CLIP's from-scratch scale, as params.yaml writes it
TOLERANCE = HealthConfig().logit_scale_tolerance
Make = Callable[..., FGCLIPVideoModel]


def _clip(tokenizer: PreTrainedTokenizerFast, scale: float, seed: int = 0) -> CLIPModel:
    """A tiny 'pretrained' CLIP whose logit_scale is ``scale``."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**TINY, logit_scale_init_value=scale)
    return CLIPModel(tiny_clip_config(cfg, tokenizer))


def _perturb(model: FGCLIPVideoModel, seed: int = 1) -> None:
    """Move the zero-initialised head parameters away from zero, so outputs depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("temporal.", "roi_projection.")):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- temperatures


@pytest.mark.parametrize("value", [LN_100, SCRATCH])
def test_scales_start_from_the_configured_value(make_model: Make, value: float) -> None:
    model = make_model(logit_scale_init_value=value)
    assert model.logit_scale_global.item() == pytest.approx(value)
    assert model.logit_scale_region.item() == pytest.approx(value)
    assert model.logit_scale_hardneg.item() == pytest.approx(value)
    assert model.clip.config.logit_scale_init_value == value


def test_scales_never_come_from_the_clip_config_default(tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = ModelConfig(**TINY)
    raw = tiny_clip_config(cfg, tokenizer).to_dict()
    del raw["logit_scale_init_value"]
    default = CLIPConfig.from_dict(raw)
    assert default.logit_scale_init_value == pytest.approx(2.6592)
    model = FGCLIPVideoModel(CLIPModel(default), cfg)
    assert [s.item() for s in model.scales()] == pytest.approx([LN_100] * 3)


def test_scales_are_clamped_at_the_max(make_model: Make) -> None:
    model = make_model()
    with torch.no_grad():
        model.logit_scale_global.fill_(5.0)
        model.logit_scale_region.fill_(1.0)
        model.logit_scale_hardneg.fill_(6.0)
    glob, region, hardneg = model.scales()
    assert glob.item() == pytest.approx(LN_100) and region.item() == pytest.approx(1.0)
    assert hardneg.item() == pytest.approx(LN_100)


def test_logit_scale_global_is_the_clip_parameter(make_model: Make) -> None:
    model = make_model()
    names = {n for n, _ in model.named_parameters() if "logit_scale" in n}
    assert names == {"clip.logit_scale", "logit_scale_region", "logit_scale_hardneg"}
    assert model.logit_scale_global is model.clip.logit_scale


# ------------------------------------------------------------- from_clip policy


def test_from_clip_error_policy_names_both_values(tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = ModelConfig(**TINY, loaded_logit_scale="error")
    with pytest.raises(LogitScaleMismatch) as err:
        FGCLIPVideoModel.from_clip(
            _clip(tokenizer, SCRATCH), cfg, source="models/clip-pretrained", tolerance=TOLERANCE
        )
    message = str(err.value)
    for part in ("2.6592", "4.6052", "models/clip-pretrained", "model.loaded_logit_scale"):
        assert part in message


def test_from_clip_mismatch_is_judged_at_the_given_tolerance(tokenizer: PreTrainedTokenizerFast) -> None:
    """The loaded-scale check and the health check read one tolerance (train.health.logit_scale_tolerance)."""
    cfg = ModelConfig(**TINY, loaded_logit_scale="error")
    near = LN_100 + 5e-4
    with pytest.raises(LogitScaleMismatch):
        FGCLIPVideoModel.from_clip(_clip(tokenizer, near), cfg, source="src", tolerance=1e-4)
    model = FGCLIPVideoModel.from_clip(_clip(tokenizer, near), cfg, source="src", tolerance=1e-3)
    assert model.load_report["global"]["action"] == "loaded"


def test_clamp_logit_scales_caps_the_stored_values(make_model: Make) -> None:
    model = make_model()
    with torch.no_grad():
        model.logit_scale_global.fill_(5.0)
        model.logit_scale_region.fill_(4.0)
        model.logit_scale_hardneg.fill_(7.0)
    model.clamp_logit_scales_()
    assert model.logit_scale_global.item() == pytest.approx(LN_100)
    assert model.logit_scale_region.item() == pytest.approx(4.0)
    assert model.logit_scale_hardneg.item() == pytest.approx(LN_100)
    assert [s.item() for s in model.scales()] == [model.logit_scale_global.item(), 4.0,
                                                  model.logit_scale_hardneg.item()]  # fmt: skip


def test_from_clip_keep_policy(tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    cfg = ModelConfig(**TINY, loaded_logit_scale="keep")
    model = FGCLIPVideoModel.from_clip(_clip(tokenizer, SCRATCH), cfg, source="src", tolerance=TOLERANCE)
    assert model.logit_scale_global.item() == pytest.approx(SCRATCH)
    assert model.logit_scale_region.item() == pytest.approx(LN_100)
    assert "[global] Loaded logit_scale = 2.6592 (exp=14.3)" in caplog.messages
    assert "[region] Loaded logit_scale = 4.6052 (exp=100.0)" in caplog.messages
    assert "[hardneg] Loaded logit_scale = 4.6052 (exp=100.0)" in caplog.messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert model.load_report["global"] == {
        "value": pytest.approx(2.6592, abs=1e-4),
        "source": "src",
        "action": "kept",
    }
    assert model.load_report["region"]["action"] == "init"


def test_from_clip_reinit_policy(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    cfg = ModelConfig(**TINY, loaded_logit_scale="reinit")
    model = FGCLIPVideoModel.from_clip(_clip(tokenizer, SCRATCH), cfg, source="src", tolerance=TOLERANCE)
    assert model.logit_scale_global.item() == pytest.approx(LN_100)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2.6592" in warnings[0] and "4.6052" in warnings[0]
    scale_lines = [m for m in caplog.messages if "Loaded logit_scale" in m]
    assert scale_lines == [
        "[global] Loaded logit_scale = 4.6052 (exp=100.0)",
        "[region] Loaded logit_scale = 4.6052 (exp=100.0)",
        "[hardneg] Loaded logit_scale = 4.6052 (exp=100.0)",
    ]
    assert model.load_report["global"]["action"] == "reinit"


def test_from_clip_path_with_matching_scale(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clip = _clip(tokenizer, LN_100)
    clip.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    cfg = ModelConfig(**TINY, loaded_logit_scale="error")
    model = FGCLIPVideoModel.from_clip(str(tmp_path), cfg, source=str(tmp_path), tolerance=TOLERANCE)
    assert model.load_report["global"] == {
        "value": pytest.approx(LN_100, abs=1e-4),
        "source": str(tmp_path),
        "action": "loaded",
    }
    assert torch.equal(model.clip.visual_projection.weight, clip.visual_projection.weight)
    assert torch.equal(model.roi_projection.weight, clip.visual_projection.weight)
    assert model.roi_projection.weight is not model.clip.visual_projection.weight
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert isinstance(load_clip(tmp_path), CLIPModel)


# ------------------------------------------------------------------ save / load


def test_save_and_load_round_trip(
    make_model: Make, make_batch: Callable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model()
    _perturb(model)
    with torch.no_grad():
        model.logit_scale_region.fill_(3.0)
        model.logit_scale_hardneg.fill_(2.0)
    model.save_pretrained(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model.safetensors", "fgclip_config.json"}

    caplog.set_level(logging.INFO, logger=LOGGER)
    loaded = FGCLIPVideoModel.from_pretrained(tmp_path / "out").eval()
    assert caplog.messages == [
        "[global] Loaded logit_scale = 4.6052 (exp=100.0)",
        "[region] Loaded logit_scale = 3.0000 (exp=20.1)",
        "[hardneg] Loaded logit_scale = 2.0000 (exp=7.4)",
    ]
    assert loaded.cfg == model.cfg
    batch = make_batch()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for field in (
        "video_embeds",
        "text_embeds",
        "region_image_embeds",
        "region_text_embeds",
        "logit_scale_region",
        "logit_scale_hardneg",
        "hardneg_text_embeds",
    ):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_from_pretrained_errors(make_model: Make, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"empty.*fgclip_config\.json"):
        FGCLIPVideoModel.from_pretrained(tmp_path / "empty")
    model = make_model()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"m.*model\.safetensors"):
        FGCLIPVideoModel.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="temporal_layers"):
        FGCLIPVideoModel.from_pretrained(tmp_path / "m", cfg=ModelConfig(**{**TINY, "temporal_layers": 1}))


# -------------------------------------------------------------- temporal head


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_video_embedding_is_the_frame_mean_at_init(make_model: Make, pooling: str) -> None:
    model = make_model(pooling=pooling)
    frames = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    expected = F.normalize(F.normalize(frames, dim=-1).mean(dim=1), dim=-1)
    torch.testing.assert_close(model.encode_video(frames), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        model.temporal.position.normal_()  # the head is no identity once trained
    assert not torch.allclose(model.encode_video(frames), expected, atol=1e-3)


def test_too_many_frames_is_an_error(make_model: Make) -> None:
    with pytest.raises(ValueError, match="max_frames=8"):
        make_model().encode_video(torch.randn(1, 9, 16))


# ------------------------------------------------------------ image features


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _fgclip_dense_reference(model: FGCLIPVideoModel, penultimate: torch.Tensor) -> torch.Tensor:
    """FG-CLIP v1's dense recipe in float64, step by step from the weights (``forward_without_attn``).

    The last block keeps its attention's value path without the attention:
    ``x + out_proj(v_proj(ln1(x)))``, then ``x + mlp(ln2(x))``; then the
    post-layernorm; the CLS token dropped.
    """
    vision = model.clip.vision_model
    last = vision.encoder.layers[-1]
    assert model.clip.config.vision_config.hidden_act == "quick_gelu"

    def w(module: torch.nn.Module, name: str) -> torch.Tensor:
        return getattr(module, name).detach().double()

    def norm(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps) * w(module, "weight") + w(module, "bias")

    def linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return x @ w(module, "weight").T + w(module, "bias")

    x = penultimate.double()
    v = linear(last.self_attn.v_proj, norm(last.layer_norm1, x))
    x = x + linear(last.self_attn.out_proj, v)
    x = x + linear(last.mlp.fc2, _quick_gelu(linear(last.mlp.fc1, norm(last.layer_norm2, x))))
    return norm(vision.post_layernorm, x)[:, 1:]


def test_dense_features_follow_fgclip_recipe(make_model: Make) -> None:
    model = make_model()
    _perturb(model)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, patches = model.encode_images(pixels, with_patches=True)
        vision = model.clip.vision_model
        out = vision(pixel_values=pixels, output_hidden_states=True)
        reference = _fgclip_dense_reference(model, out.hidden_states[-2]).reshape(3, 4, 4, 32)
        last = vision.encoder.layers[-1]
        x = out.hidden_states[-2]
        without_value = vision.post_layernorm(x + last.mlp(last.layer_norm2(x)))[:, 1:].reshape(3, 4, 4, 32)
        with_attention = vision.post_layernorm(out.last_hidden_state)[:, 1:].reshape(3, 4, 4, 32)
        projected = model.clip.get_image_features(pixel_values=pixels).pooler_output
    assert patches.shape == (3, 4, 4, 32)
    torch.testing.assert_close(patches.double(), reference, atol=1e-5, rtol=0)
    # The value branch matters: the recipe without it (this project's old one) is far off,
    # and so is the full last block (its attention mixes every token).
    assert (patches - without_value).abs().max() > 1e-2
    assert (patches - with_attention).abs().max() > 1e-2
    torch.testing.assert_close(embeds, projected)
    assert model.encode_images(pixels)[1] is None
    # In float64 the model's own path is the reference to rounding.
    model.double()
    with torch.no_grad():
        _, patches64 = model.encode_images(pixels.double(), with_patches=True)
        hidden = model.clip.vision_model(
            pixel_values=pixels.double(), output_hidden_states=True
        ).hidden_states[-2]
    torch.testing.assert_close(patches64, _fgclip_dense_reference(model, hidden).reshape(3, 4, 4, 32),
                               atol=1e-10, rtol=0)  # fmt: skip


def test_region_pooling_equals_fgclip_project_then_pool(make_model: Make) -> None:
    """FG-CLIP projects every patch, then pools; the model pools, then projects: equal (both linear)."""
    model = make_model()
    _perturb(model)
    patches = torch.randn(1, 1, 4, 4, 32, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[[[0.1, 0.2, 0.7, 0.9]], [[0.0, 0.0, 1.0, 1.0]]]])
    with torch.no_grad():
        feats, _, _ = model.encode_regions(patches, boxes, torch.ones(1, 2, 1, dtype=torch.bool))
        projected = model.roi_projection(patches[0])  # [1, 4, 4, D]
        pooled = roi_align(projected.permute(0, 3, 1, 2), boxes[0, :, 0][None], output_size=1)[0, :, :, 0, 0]
    torch.testing.assert_close(feats[0], F.normalize(pooled, dim=-1))
    # A whole-frame box averages every cell (adaptive sampling, FG-CLIP's default).
    torch.testing.assert_close(pooled[1], projected[0].mean(dim=(0, 1)), atol=1e-6, rtol=0)


def test_forward_runs_the_vision_tower_once(make_model: Make, make_batch: Callable) -> None:
    model = make_model()
    calls = []
    model.clip.vision_model.register_forward_hook(lambda module, args, output: calls.append(1))
    model(make_batch())
    assert len(calls) == 1


# ------------------------------------------------------------ region features


def test_region_features_average_valid_keyframes(make_model: Make) -> None:
    model = make_model()
    _perturb(model)
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(2, 3, 4, 4, 32, generator=g)
    boxes = torch.tensor([0.1, 0.2, 0.6, 0.9]).repeat(2, 2, 3, 1)
    boxes[0, 1, 2] = float("nan")  # garbage in a masked slot must not leak
    box_mask = torch.tensor(
        [[[True, False, True], [True, True, False]], [[False, False, False], [False, True, False]]]
    )
    with torch.no_grad():
        feats, valid, zero_frac = model.encode_regions(patches, boxes, box_mask)
    assert valid.tolist() == [[True, True], [False, True]]
    assert zero_frac == 0.0
    assert torch.isfinite(feats).all()
    assert torch.equal(feats[1, 0], torch.zeros(16))
    # Region (0, 0): mean of the RoI features on keyframes 0 and 2.
    maps = patches[0].permute(0, 3, 1, 2)
    rois = roi_align(maps, boxes[0, 0], output_size=1)[:, :, 0, 0]  # [K, C]
    expected = F.normalize(model.roi_projection((rois[0] + rois[2]) / 2), dim=-1)
    torch.testing.assert_close(feats[0, 0], expected)
    assert feats[0, 0].norm().item() == pytest.approx(1.0)


def test_zero_norm_fraction_counts_valid_regions_only(make_model: Make) -> None:
    model = make_model()
    patches = torch.randn(2, 1, 4, 4, 32)
    patches[0] = 0.0  # video 0's features are all zero: its valid regions project to zero
    boxes = torch.tensor([0.0, 0.0, 0.5, 0.5]).repeat(2, 3, 1, 1)
    box_mask = torch.tensor([[[True], [True], [False]], [[True], [True], [True]]])
    _, valid, zero_frac = model.encode_regions(patches, boxes, box_mask)
    assert valid.sum().item() == 5
    assert zero_frac == pytest.approx(2 / 5)


def test_forward_keeps_only_present_regions_with_a_box(make_model: Make, make_batch: Callable) -> None:
    model = make_model()
    batch = make_batch(b=2, k=2, r=3)
    batch.box_mask[0, 1] = False  # region (0, 1): present but no valid box
    batch.region_mask[1, 2] = False  # region (1, 2): padding
    out = model(batch)
    assert out.region_caption_ids.tolist() == [100, 102, 103, 104]
    assert out.region_image_embeds.shape == out.region_text_embeds.shape == (4, 16)
    assert out.video_embeds.shape == out.text_embeds.shape == (2, 16)
    torch.testing.assert_close(out.region_image_embeds.norm(dim=-1), torch.ones(4))
    # Region texts are the region captions of the kept regions.
    keep = torch.tensor([[True, False, True], [True, True, False]])
    expected = model.encode_text(batch.region_token_ids[keep], batch.region_text_mask[keep])
    torch.testing.assert_close(out.region_text_embeds, expected)


def test_training_step_reaches_every_parameter(make_model: Make, make_batch: Callable) -> None:
    model = make_model().train()
    negatives = RegionFeatures(
        F.normalize(torch.randn(8, 16), dim=-1),
        F.normalize(torch.randn(8, 16), dim=-1),
        torch.arange(16).view(8, 2),
    )
    result = FGCLIPLoss(region_weight=0.5, hardneg_weight=0.0)(model(make_batch()), negatives)
    assert torch.isfinite(result.loss)
    result.loss.backward()
    # Zero-initialised residual outputs block the gradient of what lies behind them at
    # step 0; every parameter is still part of the graph (DDP needs that).
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert model.logit_scale_region.grad.abs().item() > 0
    assert model.temporal.layers[0].linear2.weight.grad.abs().sum() > 0


def test_batch_without_valid_regions(make_model: Make, make_batch: Callable) -> None:
    model = make_model()
    batch = make_batch()
    batch.region_mask[:] = False
    out = model(batch)
    assert out.region_image_embeds.shape == (0, 16) and out.region_text_embeds.shape == (0, 16)
    result = FGCLIPLoss(region_weight=0.5, hardneg_weight=0.0)(out)
    assert result.loss_region.item() == 0.0 and torch.isfinite(result.loss)
    result.loss.backward()
    assert model.roi_projection.weight.grad is not None


# ------------------------------------------------------------------------ text


def test_text_is_pooled_at_eos(make_model: Make, tokenizer: PreTrainedTokenizerFast) -> None:
    model = make_model()
    assert model.clip.config.text_config.eos_token_id == tokenizer.eos_token_id == 3
    ids, mask = tokenize(tokenizer, ["the woman falls", "a car crashes into another car"], 12)
    with torch.no_grad():
        hidden = model.clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        eos = mask.sum(1) - 1
        expected = F.normalize(model.clip.text_projection(hidden[torch.arange(2), eos]), dim=-1)
        # The legacy pooling (argmax over ids) would pick the rarest word instead.
        assert (ids.argmax(dim=1) != eos).all()
        torch.testing.assert_close(model.encode_text(ids, mask), expected)
        # Causal attention: trailing padding does not change a caption's embedding.
        longer = tokenize(tokenizer, ["the woman falls"], 20)
        torch.testing.assert_close(model.encode_text(*longer)[0], expected[0])


def test_tiny_config_refuses_an_eos_id_of_two() -> None:
    tok = build_tokenizer(CAPTIONS)
    tok.eos_token = "<|startoftext|>"  # id 2
    with pytest.raises(ValueError, match="EOS id is 2"):
        tiny_clip_config(ModelConfig(**TINY), tok)


def test_stretch_position_embeddings() -> None:
    emb = torch.randn(77, 6, generator=torch.Generator().manual_seed(0))
    out = stretch_position_embeddings(emb)
    assert out.shape == (248, 6)
    assert torch.equal(out[:20], emb[:20])
    torch.testing.assert_close(out[20::4], emb[20:])  # every 4th row is an original row
    torch.testing.assert_close(out[22], (emb[20] + emb[21]) / 2)
    torch.testing.assert_close(out[21], 0.75 * emb[20] + 0.25 * emb[21])
    torch.testing.assert_close(out[247], emb[76] + 0.75 * (emb[76] - emb[75]))


def test_long_text_adds_fgclip_tables_beside_the_short_one(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    clip = _clip(tokenizer, LN_100)
    plain = FGCLIPVideoModel.from_clip(copy.deepcopy(clip), ModelConfig(**TINY), source="tiny",
                                       tolerance=TOLERANCE).eval()  # fmt: skip
    original = clip.text_model.embeddings.position_embedding.weight.detach().clone()
    cfg = ModelConfig(**{**TINY, "long_text": True, "max_caption_len": 100})
    model = FGCLIPVideoModel.from_clip(clip, cfg, source="tiny", tolerance=TOLERANCE).eval()
    embeddings = model.clip.text_model.embeddings
    assert torch.equal(embeddings.position_embedding.weight, original)  # the short table is untouched
    stretched = stretch_position_embeddings(original)
    for table in (embeddings.position_embedding_ori, embeddings.position_embedding_res):
        assert torch.equal(table.weight, stretched)
    assert model.clip.config.text_config.max_position_embeddings == 77
    torch.testing.assert_close(model.clip.text_filip_projection.weight, model.clip.text_projection.weight)

    short_ids, short_mask = tokenize(tokenizer, CAPTIONS[:3], 12)
    long_ids, long_mask = tokenize(tokenizer, [" ".join(CAPTIONS * 2)], 100)
    assert long_mask.sum() > 77
    with torch.no_grad():
        # Short texts read the original table and projection: as without long_text.
        torch.testing.assert_close(
            model.encode_text(short_ids, short_mask), plain.encode_text(short_ids, short_mask)
        )
        # At initialisation the long path of a short caption is the short path (ori[:20] = original[:20]).
        torch.testing.assert_close(model.encode_text(short_ids, short_mask, long=True),
                                   plain.encode_text(short_ids, short_mask))  # fmt: skip
        long_text = model.encode_text(long_ids, long_mask, long=True)
        with pytest.raises(ValueError, match="77 positions of the short"):
            model.encode_text(long_ids, long_mask)
        # Position p reads ori below 20 and res from 20 on.
        with embeddings.long_path():
            got = embeddings(input_ids=long_ids)
        kept = embeddings.position_embedding_ori.weight.clone()
        embeddings.position_embedding_ori.weight.add_(1.0)
        with embeddings.long_path():
            moved_ori = embeddings(input_ids=long_ids)
        embeddings.position_embedding_ori.weight.copy_(kept)
    assert torch.allclose(moved_ori[:, :20] - got[:, :20], torch.ones(()))
    assert torch.equal(moved_ori[:, 20:], got[:, 20:])
    assert not embeddings.long  # the path switch is scoped to the call

    # Gradients of a long caption reach ori's first 20 rows and res's others only.
    model.train()
    model.encode_text(long_ids, long_mask, long=True).sum().backward()
    ori, res = embeddings.position_embedding_ori.weight.grad, embeddings.position_embedding_res.weight.grad
    assert ori[:20].abs().sum() > 0 and ori[20:].abs().sum() == 0
    assert res[:20].abs().sum() == 0 and res[20:100].abs().sum() > 0
    assert (
        embeddings.position_embedding.weight.grad is None
        or embeddings.position_embedding.weight.grad.abs().sum() == 0
    )
    assert model.clip.text_filip_projection.weight.grad is not None

    model.eval().save_pretrained(tmp_path)
    loaded = FGCLIPVideoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(long_ids, long_mask, long=True), long_text)


def test_a_model_of_the_old_format_is_refused_by_name(make_model: Make, tmp_path: Path) -> None:
    make_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "fgclip_config.json").read_text())
    del config["format_version"]
    (tmp_path / "fgclip_config.json").write_text(json.dumps(config))
    with pytest.raises(OldModelFormatError, match="model format 1.*re-run the train stage"):
        FGCLIPVideoModel.from_pretrained(tmp_path)


def test_from_scratch_config_follows_the_model_config(
    tiny_cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast
) -> None:
    config = tiny_clip_config(tiny_cfg, tokenizer)
    assert config.text_config.vocab_size == len(tokenizer)
    assert (
        config.text_config.pad_token_id,
        config.text_config.bos_token_id,
        config.text_config.eos_token_id,
    ) == (0, 2, 3)
    assert config.text_config.max_position_embeddings == 77
    assert config.vision_config.intermediate_size == 4 * tiny_cfg.vision_hidden
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (32, 8)
    assert config.projection_dim == 16 and config.logit_scale_init_value == pytest.approx(LN_100)
    assert math.isclose(CLIPModel(config).logit_scale.item(), LN_100, rel_tol=1e-6)
    # long_text keeps the short table in the config; the long tables are the model's own.
    long = tiny_clip_config(ModelConfig(**{**TINY, "long_text": True}), tokenizer)
    assert long.text_config.max_position_embeddings == 77


def test_sdpa_attention_matches_eager(make_model: Make, make_batch: Callable) -> None:
    """train.attn_implementation: same weights, float32, eager vs sdpa agree to 1e-5 (gradients: to rounding)."""
    model = make_model().train()
    assert model.clip.config._attn_implementation == "sdpa"  # what transformers 5 builds by default
    batch = make_batch()
    outputs, grads = {}, {}
    for impl in ("eager", "sdpa"):
        model.clip.set_attn_implementation(impl)
        assert model.clip.vision_model.config._attn_implementation == impl
        assert model.clip.text_model.config._attn_implementation == impl
        model.zero_grad(set_to_none=True)
        out = model(batch)
        FGCLIPLoss(region_weight=0.5, hardneg_weight=0.5)(out).loss.backward()
        outputs[impl] = out
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    eager, sdpa = outputs["eager"], outputs["sdpa"]
    for name in ("video_embeds", "text_embeds", "region_image_embeds", "region_text_embeds", "hardneg_text_embeds"):
        torch.testing.assert_close(getattr(sdpa, name), getattr(eager, name), atol=1e-5, rtol=0)
    assert grads["eager"].keys() == grads["sdpa"].keys()
    for name, grad in grads["eager"].items():
        # Float32 rounding of a sum is relative to the sum's terms, not to its result: the
        # embedding gradients sum ~1e2-sized terms over every token, and how the kernels
        # split those sums can move with memory alignment and threads (late in the full suite
        # one element failed a fixed 1e-5 + 1e-4 relative that passes in a fresh process,
        # where the worst difference is 5e-5 on gradients up to ~1e2). So the tolerance scales
        # with the tensor's largest gradient (observed <= 7e-7 of it); a wrong mask or scale
        # is off by O(1).
        atol = 1e-5 * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(
            grads["sdpa"][name], grad, atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
