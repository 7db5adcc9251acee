"""Zero-shot snippet scoring with a tiny randomly initialised video FG-CLIP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from fgclip.config import Params
from fgclip.data.images import CLIP_MEAN, CLIP_STD, PixelStats
from fgclip.eval.zeroshot import (
    class_embeddings,
    frame_features,
    grid_boxes,
    region_grid_log_odds,
    snippet_log_odds,
    snippet_windows,
)
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.tokenizer import tokenize


@pytest.fixture(scope="module")
def classes(
    eval_params: Params,
    eval_tokenizer: PreTrainedTokenizerFast,
    make_model: Callable[[int], FGCLIPVideoModel],
) -> tuple[FGCLIPVideoModel, list[str], torch.Tensor]:
    model = make_model(0)
    cfg = eval_params.evaluate
    names, embeds = class_embeddings(model, eval_tokenizer, cfg.prompts, cfg.templates, 16, batch_size=4)
    return model, names, embeds


def test_windows_are_centred_and_clamped():
    expected = [[0, 0, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 4]]
    assert snippet_windows(5, 4).tolist() == expected
    assert snippet_windows(4, 3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert snippet_windows(1, 4).tolist() == [[0, 0, 0, 0]]
    windows = snippet_windows(9, 8)
    assert windows[:, 4].tolist() == list(range(9))  # snippet s sits at the clip's centre slot T // 2


def test_class_embeddings_average_prompts_and_templates(
    eval_params: Params, eval_tokenizer: PreTrainedTokenizerFast, classes
):
    model, names, embeds = classes
    cfg = eval_params.evaluate
    assert names == list(cfg.prompts) and "Normal" in names
    assert embeds.shape == (len(names), 16)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(len(names)))
    texts = [t.format(p) for p in cfg.prompts["Arson"] for t in cfg.templates]
    with torch.no_grad():
        direct = model.encode_text(*tokenize(eval_tokenizer, texts, 16)).mean(dim=0)
    torch.testing.assert_close(embeds[names.index("Arson")], direct / direct.norm(), atol=1e-5, rtol=1e-5)


def test_class_embeddings_need_normal_and_an_anomaly_class(
    eval_tokenizer: PreTrainedTokenizerFast, make_model: Callable[[int], FGCLIPVideoModel]
):
    model = make_model(0)
    with pytest.raises(ValueError, match="'Normal' class"):
        class_embeddings(model, eval_tokenizer, {"Arson": ["fire"]}, ["{}"], 16, 4)
    with pytest.raises(ValueError, match="at least one anomaly class"):
        class_embeddings(model, eval_tokenizer, {"Normal": ["street"]}, ["{}"], 16, 4)
    with pytest.raises(ValueError, match=r"empty: \['Arson'\]"):
        class_embeddings(model, eval_tokenizer, {"Normal": ["street"], "Arson": []}, ["{}"], 16, 4)


def test_normal_matching_video_scores_low_and_anomaly_high(classes):
    # At initialisation the temporal head returns the normalised frame mean, so
    # frames equal to a class's text embedding make a video of exactly that class.
    model, names, embeds = classes
    normal = names.index("Normal")
    normal_video = embeds[normal].expand(6, -1)
    arson_video = embeds[names.index("Arson")].expand(6, -1)
    # The score is the sigmoid of the log-odds, as the evaluate stage computes it.
    low = torch.sigmoid(snippet_log_odds(model, normal_video, embeds, normal, clip_len=4, batch_size=4))
    high = torch.sigmoid(snippet_log_odds(model, arson_video, embeds, normal, clip_len=4, batch_size=4))
    assert low.shape == high.shape == (6,)
    assert (low < 0.05).all() and (high > 0.95).all()


def test_confident_scores_do_not_saturate_to_one(classes):
    # Logit gaps of 25 and 30 (p(Normal) ~ 1e-11, 1e-13): 1 - softmax in float32 gives 1.0 for both.
    model, _, _ = classes
    u, v = torch.eye(16)[0], torch.eye(16)[1]
    frames = torch.stack([u, u])
    scores = []
    for cos in (0.75, 0.7):
        normal = cos * u + (1 - cos**2) ** 0.5 * v
        log_odds = snippet_log_odds(model, frames, torch.stack([normal, u]), 0, clip_len=2, batch_size=2)
        scores.append(torch.sigmoid(log_odds))
    assert scores[0].dtype == torch.float64
    assert (scores[0] < 1.0).all() and (scores[0] < scores[1]).all()
    assert scores[0][0].item() == pytest.approx(
        1 - torch.tensor(-25.0, dtype=torch.float64).exp().item(), abs=1e-12
    )


def test_snippet_log_odds_match_a_per_snippet_reference(classes):
    model, names, embeds = classes
    # A temporal head away from its identity init: clip order and content now matter.
    moved = FGCLIPVideoModel(model.clip, model.cfg).eval()
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in moved.temporal.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    frames = torch.randn(7, 16, generator=g)
    normal = names.index("Normal")
    scores = torch.sigmoid(snippet_log_odds(moved, frames, embeds, normal, clip_len=4, batch_size=3))
    assert ((scores >= 0) & (scores <= 1)).all()
    with torch.no_grad():
        scale = moved.scales()[0].exp()
        for s in range(7):
            idx = [min(max(i, 0), 6) for i in range(s - 2, s + 2)]
            video = moved.encode_video(frames[idx][None])
            p_normal = (scale * video @ embeds.T).softmax(dim=-1)[0, normal]
            assert scores[s].item() == pytest.approx(1 - p_normal.item(), abs=1e-5)


def test_frame_features_batched_like_one_pass(tmp_path: Path, make_model: Callable[[int], FGCLIPVideoModel]):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i:06d}.jpg")
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(paths[-1])
    a, b = make_model(0), make_model(1)
    features = frame_features([a, b], paths, batch_size=2)
    assert all(regions is None for _, regions in features)  # no boxes, no dense RoI features
    batched = [embeds for embeds, _ in features]
    pixels = _reference_pixels(paths, 32)
    assert pixels.shape == (5, 3, 32, 32)
    with torch.no_grad():
        for model, embeds in zip((a, b), batched):
            torch.testing.assert_close(embeds, model.encode_images(pixels)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def _reference_pixels(
    paths: list[Path], size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD
) -> torch.Tensor:
    """Written out from OpenAI's recipe: RGB, bicubic resize, 0-1, minus mean over std."""
    out = []
    for path in paths:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
        out.append(((rgb / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


def test_each_model_gets_frames_normalised_with_its_own_statistics(
    tmp_path: Path, make_model: Callable[[int], FGCLIPVideoModel]
):
    paths = _random_frames(tmp_path, 3)
    clip_model, other = make_model(0), make_model(0)  # the same weights
    imagenet = PixelStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    other.pixel_stats = imagenet
    (a, _), (b, _) = frame_features([clip_model, other], paths, batch_size=2)
    with torch.no_grad():
        want_a = clip_model.encode_images(_reference_pixels(paths, 32))[0]
        want_b = other.encode_images(_reference_pixels(paths, 32, imagenet.mean, imagenet.std))[0]
    torch.testing.assert_close(a, want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, want_b, atol=1e-5, rtol=1e-5)
    assert (a - b).abs().max() > 1e-3  # same weights, other input statistics: other embeddings


def _random_frames(tmp_path: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"{i:06d}.jpg")
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_grid_boxes_cover_the_frame_then_add_it_whole():
    expected = [
        [0.0, 0.0, 0.5, 0.5],
        [0.5, 0.0, 1.0, 0.5],
        [0.0, 0.5, 0.5, 1.0],
        [0.5, 0.5, 1.0, 1.0],
        [0.0, 0.0, 1.0, 1.0],
    ]
    assert grid_boxes(2).tolist() == expected
    assert grid_boxes(1).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert grid_boxes(3).shape == (10, 4)


def test_region_grid_scores_equal_a_patch_mean_reference(classes, tmp_path: Path):
    """Each 2x2 cell of the tiny model's 4x4 patch grid is exactly the mean of its 4 patch tokens
    under RoIAlign (1 bin, 2x2 samples at patch centres); the whole frame is the mean of all 16."""
    model, names, embeds = classes
    # A region projection and temperature apart from the global ones, so using the wrong path shows.
    moved = FGCLIPVideoModel(model.clip, model.cfg).eval()
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        moved.roi_projection.weight.add_(0.5 * torch.randn(moved.roi_projection.weight.shape, generator=g))
        moved.logit_scale_region.fill_(3.0)
    paths = _random_frames(tmp_path, 5)
    normal = names.index("Normal")
    [(frame_embeds, regions)] = frame_features([moved], paths, batch_size=2, boxes=grid_boxes(2))
    assert regions.shape == (5, 5, embeds.shape[1])
    log_odds = region_grid_log_odds(moved, regions, embeds, normal)

    with torch.no_grad():
        _, patches = moved.encode_images(_reference_pixels(paths, 32), with_patches=True)  # [5, 4, 4, C]
        assert patches.shape[1:3] == (4, 4)
        pooled = [
            patches[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(1, 2)) for r in (0, 1) for c in (0, 1)
        ]
        pooled.append(patches.mean(dim=(1, 2)))
        cells = torch.nn.functional.normalize(moved.roi_projection(torch.stack(pooled, 1)), dim=-1)
        probs = (np.exp(3.0) * cells @ embeds.T).double().softmax(dim=-1)  # [5, 5 regions, C]
        reference = torch.log((1 - probs[..., normal]) / probs[..., normal]).amax(dim=1)
    torch.testing.assert_close(log_odds, reference, atol=1e-6, rtol=1e-6)

    # The frame path (temporal head over the video's frame embeddings) gives other scores.
    frame_log_odds = snippet_log_odds(moved, frame_embeds, embeds, normal, clip_len=1, batch_size=4)
    assert not torch.allclose(frame_log_odds, log_odds, atol=1e-3)
