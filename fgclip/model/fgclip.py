"""Video FG-CLIP: a Hugging Face CLIP with a temporal head and region-level alignment.

The model wraps a ``transformers.CLIPModel`` (OpenAI weights or the embedded
stand-in) and adds what FG-CLIP and the video task need:

- a temporal head over per-frame embeddings (learnable temporal positions,
  pre-norm transformer layers, attention pooling) whose residual branches and
  pooling query start at zero, so at initialisation the video embedding is the
  normalised mean of the frame embeddings: fine-tuning starts exactly from the
  pretrained CLIP's behaviour;
- FG-CLIP's dense patch features: the penultimate hidden state through the last
  block with its attention replaced by the attention's value path
  (``x + out_proj(v_proj(ln1(x)))``, then ``+ mlp(ln2(.))``), then the
  post-layernorm; pooled per region with RoIAlign (FG-CLIP's adaptive sampling,
  ``model.roi_sampling_ratio = -1``) and projected by ``roi_projection``, a copy
  of the visual projection (projection and RoIAlign are both linear, so pooling
  first equals FG-CLIP's project-then-pool);
- FG-CLIP's two text paths when ``model.long_text`` is on: short texts (region
  captions, hard negatives, prompts) keep CLIP's 77-entry position table and
  ``text_projection``; global captions take two 248-entry stretched tables
  (``position_embedding_ori`` for the first 20 positions,
  ``position_embedding_res`` for the rest) and ``text_filip_projection``, a copy
  of ``text_projection``;
- three learnable temperatures, global, region and hard-negative, all
  initialised from ``model.logit_scale_init_value`` (ln 100) and never from
  CLIP's from-scratch default 2.6592 (ln 1/0.07), the users' original bug.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from fgclip.config import ModelConfig
from fgclip.data.images import CLIP_PIXELS, PixelStats, read_pixel_stats
from fgclip.errors import FGClipError
from fgclip.model.roi_align import roi_align
from fgclip.model.sources import FGCLIP_EXTRA

if TYPE_CHECKING:  # the model reads a batch's fields; it builds none
    from fgclip.data.batch import Batch

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "fgclip_config.json"
# What a saved model directory holds; bumped when the state dict's layout changes
# (2: hard-negative scale, FG-CLIP's short + long text position tables).
FORMAT_VERSION = 2
CLIP_TEXT_POSITIONS = 77
LONG_TEXT_POSITIONS = 248
# Long-CLIP / FG-CLIP: the first 20 positions are well trained and kept; the rest
# are interpolated 4x: 20 + 57 * 4 = 248.
LONG_TEXT_KEEP = 20
LONG_TEXT_FACTOR = 4
# ModelConfig keys that shape this module's own layers (the CLIP's come from its config).
_HEAD_KEYS = ("temporal_layers", "temporal_heads", "pooling", "max_frames", "long_text")
SCALE_NAMES = ("global", "region", "hardneg")
# What `fgclip import-weights` writes beside a CLIPModel for the parts it has no place
# for (FG-CLIP's region and hard-negative scales, long-caption tables and projection).
EXTRA_NAME = "fgclip_extra.safetensors"
EXTRA_SCALE_KEYS = {"region": "logit_scale_region", "hardneg": "logit_scale_hardneg"}
EXTRA_LONG_KEYS = ("position_embedding_ori", "position_embedding_res", "text_filip_projection")


class LogitScaleMismatch(FGClipError, ValueError):
    """A loaded logit scale differs from ``model.logit_scale_init_value`` and the policy is "error"."""


def capped_logit_scale(scale: torch.Tensor, top: float) -> torch.Tensor:
    """A logit scale as the losses use it: at most ``top`` (``model.logit_scale_max``, ln 100)."""
    return scale.clamp(max=top)


def _describe_scale(value: float) -> str:
    return f"{value:.4f} (exp={math.exp(value):.1f})"


def tiny_clip_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> CLIPConfig:
    """The small from-scratch CLIP described by ``cfg``, with the tokenizer's vocab and special ids."""
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id == 2:
        # transformers pools CLIP text with the legacy argmax over ids when eos_token_id == 2.
        raise ValueError(
            f"tokenizer EOS id is {tokenizer.eos_token_id}: CLIP text pooling needs a real EOS id other than 2"
        )
    return clip_config(
        cfg,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def clip_config(
    cfg: ModelConfig, *, vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int
) -> CLIPConfig:
    """A ``CLIPConfig`` with ``cfg``'s shapes and the given vocabulary (benchmarks use OpenAI's 49,408)."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.text_hidden,
        "intermediate_size": 4 * cfg.text_hidden,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        # The short table; long_text adds FG-CLIP's 248-entry tables beside it.
        "max_position_embeddings": CLIP_TEXT_POSITIONS,
        "projection_dim": cfg.projection_dim,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    vision = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_size": cfg.vision_hidden,
        "intermediate_size": 4 * cfg.vision_hidden,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "projection_dim": cfg.projection_dim,
    }
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=cfg.projection_dim,
        # Explicit: CLIPConfig's class default is 2.6592.
        logit_scale_init_value=cfg.logit_scale_init_value,
    )


class OldModelFormatError(FGClipError, ValueError):
    """A saved model directory from a version with another state-dict layout."""


class ExtraWeightsError(FGClipError, ValueError):
    """A ``fgclip_extra.safetensors`` that does not fit its CLIP (unknown keys, wrong shapes, parts missing)."""


class CLIPLoadError(FGClipError, OSError):
    """A pretrained CLIP that transformers could not load (an OSError, as transformers raises)."""


def load_clip(name_or_path: str | os.PathLike) -> CLIPModel:
    """A pretrained ``CLIPModel``: a local directory or a hub id (safetensors weights only)."""
    try:
        clip, info = CLIPModel.from_pretrained(str(name_or_path), use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError) as exc:
        # transformers' own text runs to several lines; its first one says what is missing.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIPLoadError(f"{name_or_path}: cannot load a CLIP model: {first}") from exc
    # FG-CLIP's weights load as a CLIPModel with its own parts dropped (the region scale
    # then comes from a default: the users' bug); a hub id cannot be told apart earlier.
    dropped = sorted(k for k in info.get("unexpected_keys", ()) if k in FGCLIP_EXTRA)
    if dropped:
        raise CLIPLoadError(
            f"{name_or_path}: FG-CLIP weights ({', '.join(dropped)}), which a CLIPModel would drop: "
            "convert them (fgclip import-weights, or a local directory in model.pretrained)"
        )
    return clip


def read_extra(clip_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path | None]:
    """The FG-CLIP parts ``fgclip import-weights`` wrote beside a CLIP directory, and their file.

    Empty (and None) for a plain CLIP or a hub id: nothing there to load.
    """
    file = Path(clip_path) / EXTRA_NAME
    if not file.is_file():
        return {}, None
    try:
        tensors = load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise ExtraWeightsError(f"{file}: not a readable safetensors file: {exc}") from exc
    unknown = sorted(set(tensors) - set(EXTRA_SCALE_KEYS.values()) - set(EXTRA_LONG_KEYS))
    if unknown:
        raise ExtraWeightsError(
            f"{file}: unknown keys {', '.join(unknown)}: not written by fgclip import-weights"
        )
    return tensors, file


def _loaded_scale_action(
    name: str, loaded: float, wanted: float, policy: str, origin: str, tolerance: float
) -> str:
    """``model.loaded_logit_scale`` for one loaded scale: "loaded" (within tolerance), "kept" or "reinit"."""
    if abs(loaded - wanted) <= tolerance:
        return "loaded"
    what = "logit_scale" if name == "global" else f"{name} logit_scale"
    if policy == "error":
        raise LogitScaleMismatch(
            f"{origin}: loaded {what} = {_describe_scale(loaded)} differs from "
            f"model.logit_scale_init_value = {_describe_scale(wanted)}; set model.loaded_logit_scale "
            "to 'keep' (trust the loaded value) or 'reinit' (use the configured one) in params.yaml"
        )
    if policy == "keep":
        return "kept"
    logger.warning(
        "[%s] logit_scale %s from %s replaced by model.logit_scale_init_value = %s",
        name,
        _describe_scale(loaded),
        origin,
        _describe_scale(wanted),
    )
    return "reinit"


def stretch_position_embeddings(
    emb: torch.Tensor, keep: int = LONG_TEXT_KEEP, factor: int = LONG_TEXT_FACTOR
) -> torch.Tensor:
    """Long-CLIP's position stretch: ``[L, C] -> [keep + (L - keep) * factor, C]`` (77 -> 248).

    Rows ``< keep`` are copied. Each later row ``i`` becomes ``factor`` rows
    linearly interpolated from row ``i`` towards row ``i + 1``; the last row
    extrapolates along the last difference, as Long-CLIP does.
    """
    if not 1 <= keep < emb.shape[0] - 1:
        raise ValueError(f"keep={keep} must leave at least two rows of the {emb.shape[0]} to interpolate")
    tail = emb[keep:]
    # One extrapolated row so the last kept row also has a "next" row.
    anchors = torch.cat([tail, (2 * tail[-1] - tail[-2])[None]])
    w = torch.arange(factor, dtype=emb.dtype, device=emb.device)[:, None] / factor  # [factor, 1]
    stretched = anchors[:-1, None] * (1 - w) + anchors[1:, None] * w  # [L - keep, factor, C]
    return torch.cat([emb[:keep], stretched.reshape(-1, emb.shape[1])])


class LongTextError(FGClipError, ValueError):
    """A text model whose position table is not CLIP's 77 entries cannot get FG-CLIP's long path."""


class LongTextEmbeddings(nn.Module):
    """CLIP's text embeddings with FG-CLIP's second position path for long captions.

    Keeps CLIP's token table and its 77-entry ``position_embedding`` (the short
    path: region captions, hard negatives, prompts) and adds two 248-entry tables,
    both initialised with the stretch of the short one: position ``p < 20`` of a
    long caption reads ``position_embedding_ori``, later ones
    ``position_embedding_res`` (FG-CLIP's names, so its checkpoints map key for
    key). Which path a forward pass takes is set by :meth:`long_path`: the text
    transformer calls this module without saying which kind of text it encodes.
    """

    def __init__(self, short: nn.Module) -> None:
        super().__init__()
        table = short.position_embedding
        if table.num_embeddings != CLIP_TEXT_POSITIONS:
            raise LongTextError(
                f"model.long_text needs a {CLIP_TEXT_POSITIONS}-position text model, "
                f"this one has {table.num_embeddings}"
            )
        self.token_embedding = short.token_embedding
        self.position_embedding = table
        stretched = stretch_position_embeddings(table.weight.detach())
        self.position_embedding_ori = nn.Embedding.from_pretrained(stretched.clone(), freeze=False)
        self.position_embedding_res = nn.Embedding.from_pretrained(stretched.clone(), freeze=False)
        self.register_buffer(
            "position_ids", torch.arange(LONG_TEXT_POSITIONS, device=stretched.device)[None], persistent=False
        )
        self.long = False

    @contextmanager
    def long_path(self, on: bool = True) -> Iterator[None]:
        before, self.long = self.long, on
        try:
            yield
        finally:
            self.long = before

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        length = input_ids.shape[-1] if input_ids is not None else inputs_embeds.shape[-2]
        limit = LONG_TEXT_POSITIONS if self.long else CLIP_TEXT_POSITIONS
        if length > limit:
            raise ValueError(
                f"{length} tokens exceed the {limit} positions of the {'long' if self.long else 'short'} text path"
            )
        if position_ids is None:
            position_ids = self.position_ids[:, :length]
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        if not self.long:
            return inputs_embeds + self.position_embedding(position_ids)
        kept = (position_ids < LONG_TEXT_KEEP)[..., None]
        positions = torch.where(
            kept, self.position_embedding_ori(position_ids), self.position_embedding_res(position_ids)
        )
        return inputs_embeds + positions


class LogitScales(NamedTuple):
    """The three temperatures as the losses use them (clamped at ``model.logit_scale_max``)."""

    glob: torch.Tensor
    region: torch.Tensor
    hardneg: torch.Tensor


class TemporalHead(nn.Module):
    """Frame embeddings ``[B, T, D]`` -> one video embedding ``[B, D]`` (unnormalised).

    Every path that could move the output away from the frame mean starts at zero:
    the temporal positions, the output projections of each residual branch, and the
    pooling query (uniform attention weights = mean pooling).
    """

    def __init__(self, dim: int, layers: int, heads: int, max_frames: int, pooling: str) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.temporal_heads={heads} must divide the projection dim {dim}")
        self.pooling = pooling
        self.position = nn.Parameter(torch.zeros(max_frames, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                dim_feedforward=4 * dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        for layer in self.layers:
            for proj in (layer.self_attn.out_proj, layer.linear2):
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
        if pooling == "attention":
            self.key_norm = nn.LayerNorm(dim)
            self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        t = frames.shape[1]
        if t > self.position.shape[0]:
            raise ValueError(f"{t} frames per video exceed model.max_frames={self.position.shape[0]}")
        x = frames + self.position[:t]
        for layer in self.layers:
            x = layer(x)
        if self.pooling == "mean":
            return x.mean(dim=1)
        scores = self.key_norm(x) @ self.query / math.sqrt(x.shape[-1])  # [B, T]
        return (scores.softmax(dim=1).unsqueeze(-1) * x).sum(dim=1)


@dataclass
class FGCLIPOutput:
    """Features of one batch for ``FGCLIPLoss`` (M = present regions with a valid box)."""

    video_embeds: torch.Tensor  # [B, D], L2-normalised
    text_embeds: torch.Tensor  # [B, D], L2-normalised
    caption_ids: torch.Tensor  # [B]
    region_image_embeds: torch.Tensor  # [M, D], L2-normalised
    region_text_embeds: torch.Tensor  # [M, D], L2-normalised
    region_caption_ids: torch.Tensor  # [M]
    # [M] ids of what each region shows (equal = same pixels, e.g. a whole-frame box
    # with several captions).
    region_image_ids: torch.Tensor
    zero_norm_frac: float
    logit_scale_global: torch.Tensor  # clamped at model.logit_scale_max
    logit_scale_region: torch.Tensor
    logit_scale_hardneg: torch.Tensor
    # [M, N, D] L2-normalised hard-negative captions of each region above (zero where
    # absent) and [M, N] which exist; N = 0 when the batch carries none.
    hardneg_text_embeds: torch.Tensor | None = None
    hardneg_mask: torch.Tensor | None = None


class FGCLIPVideoModel(nn.Module):
    """Video FG-CLIP on a Hugging Face ``CLIPModel``.

    ``__init__`` initialises the three logit scales from ``cfg.logit_scale_init_value``;
    use ``from_clip`` to start from pretrained weights (with the loaded-scale
    policy) and ``from_pretrained`` to reload a saved model. The global scale is
    the CLIP's own ``logit_scale`` parameter, so ``model.clip`` exported on its own
    carries the trained temperature; ``logit_scale_global`` is an alias of it.
    """

    def __init__(self, clip: CLIPModel, cfg: ModelConfig) -> None:
        super().__init__()
        self.clip = clip
        self.cfg = cfg
        self.load_report: dict[str, dict[str, Any]] = {}
        # How this model's frames are normalised: the weights' own statistics, saved with it.
        self.pixel_stats: PixelStats = CLIP_PIXELS
        if cfg.long_text:
            self._add_long_text_path()
        dim = clip.config.projection_dim
        self.temporal = TemporalHead(
            dim, cfg.temporal_layers, cfg.temporal_heads, cfg.max_frames, cfg.pooling
        )
        # FG-CLIP initialises the region projection from the visual projection.
        self.roi_projection = copy.deepcopy(clip.visual_projection)
        with torch.no_grad():
            clip.logit_scale.fill_(cfg.logit_scale_init_value)
        self.logit_scale_region = nn.Parameter(torch.tensor(float(cfg.logit_scale_init_value)))
        self.logit_scale_hardneg = nn.Parameter(torch.tensor(float(cfg.logit_scale_init_value)))

    # ----------------------------------------------------------------- loading

    @property
    def logit_scale_global(self) -> nn.Parameter:
        return self.clip.logit_scale

    @classmethod
    def from_clip(
        cls,
        clip_or_path: CLIPModel | str | os.PathLike,
        cfg: ModelConfig,
        *,
        source: str | os.PathLike,
        tolerance: float,
    ) -> FGCLIPVideoModel:
        """Build from a pretrained CLIP, applying ``cfg.loaded_logit_scale`` to every scale it has.

        The CLIP's ``logit_scale`` becomes the global scale. A directory that
        ``fgclip import-weights`` wrote from FG-CLIP weights also holds
        ``fgclip_extra.safetensors`` (:data:`EXTRA_NAME`): its region and hard-negative
        scales go through the same policy, and with ``cfg.long_text`` its long-caption
        tables and projection are loaded instead of stretched from the short table.
        A loaded scale that differs from ``cfg.logit_scale_init_value`` by more than
        ``tolerance`` (``train.health.logit_scale_tolerance``, which the health check
        uses too): "error" raises ``LogitScaleMismatch``, "keep" keeps it, "reinit"
        replaces it (with a warning); within it, the configured value stands. A scale
        the source does not have (a plain CLIP has no region scale) starts from the
        config value.
        """
        source = str(source)  # the load report must stay JSON-serialisable
        if isinstance(clip_or_path, CLIPModel):
            clip, extra, extra_file, pixels = clip_or_path, {}, None, CLIP_PIXELS
        else:
            extra, extra_file = read_extra(clip_or_path)
            pixels = read_pixel_stats(clip_or_path)
            clip = load_clip(clip_or_path)
        wanted = float(cfg.logit_scale_init_value)
        loaded = {"global": (clip.logit_scale.item(), source)}
        for name, key in EXTRA_SCALE_KEYS.items():
            if key in extra:
                loaded[name] = (extra[key].item(), str(extra_file))
        # Every scale is judged before anything is built: an "error" names the first one.
        actions = {
            name: _loaded_scale_action(name, value, wanted, cfg.loaded_logit_scale, origin, tolerance)
            for name, (value, origin) in loaded.items()
        }
        model = cls(clip, cfg)
        model.pixel_stats = pixels
        if pixels != CLIP_PIXELS:
            logger.info(
                "[pixels] %s normalises images with mean %s, std %s (its preprocessor_config.json)",
                source,
                list(pixels.mean),
                list(pixels.std),
            )
        scales = model.named_scales()
        model.load_report = {}
        for name in SCALE_NAMES:
            if name not in loaded:
                logger.info(
                    "[%s] no %s logit_scale in %s (a plain CLIP has none): initialised from "
                    "model.logit_scale_init_value = %s",
                    name,
                    name,
                    source,
                    _describe_scale(wanted),
                )
                model.load_report[name] = {
                    "value": scales[name].item(),
                    "source": "model.logit_scale_init_value",
                    "action": "init",
                }
                continue
            value, origin = loaded[name]
            if actions[name] == "kept":
                with torch.no_grad():
                    scales[name].fill_(value)
            model.load_report[name] = {
                "value": scales[name].item(),
                "source": origin,
                "action": actions[name],
            }
        model._load_long_text(extra, extra_file, source)
        for name, scale in scales.items():
            # The global line stays as it always was; a scale from the sidecar names its file.
            from_extra = name != "global" and name in loaded and actions[name] != "reinit"
            origin = f" from {loaded[name][1]}" if from_extra else ""
            logger.info("[%s] Loaded logit_scale = %s%s", name, _describe_scale(scale.item()), origin)
        return model

    def _load_long_text(self, extra: dict[str, torch.Tensor], extra_file: Path | None, source: str) -> None:
        """FG-CLIP's long-caption tables and projection from the sidecar, never silently dropped."""
        present = [k for k in EXTRA_LONG_KEYS if k in extra]
        if present and len(present) != len(EXTRA_LONG_KEYS):
            raise ExtraWeightsError(
                f"{extra_file}: has {', '.join(present)} but not "
                f"{', '.join(k for k in EXTRA_LONG_KEYS if k not in extra)}: re-run fgclip import-weights"
            )
        if not self.cfg.long_text:
            if present:
                logger.info(
                    "[long_text] %s holds FG-CLIP's long-caption tables and projection: not used "
                    "(model.long_text is off)",
                    extra_file,
                )
                self.load_report["long_text"] = {"source": str(extra_file), "action": "unused"}
            return
        if not present:
            logger.info(
                "[long_text] no long-caption tables in %s: position_embedding_ori/_res stretched from its "
                "%d-entry table, text_filip_projection copied from text_projection",
                source,
                CLIP_TEXT_POSITIONS,
            )
            self.load_report["long_text"] = {"source": source, "action": "stretched"}
            return
        embeddings = self.clip.text_model.embeddings
        targets = {
            "position_embedding_ori": embeddings.position_embedding_ori.weight,
            "position_embedding_res": embeddings.position_embedding_res.weight,
            "text_filip_projection": self.clip.text_filip_projection.weight,
        }
        for key, target in targets.items():
            if extra[key].shape != target.shape:
                raise ExtraWeightsError(
                    f"{extra_file}: {key} has shape {tuple(extra[key].shape)}, this CLIP's is {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(extra[key].to(target.dtype))
        logger.info(
            "[long_text] Loaded position_embedding_ori/_res and text_filip_projection from %s", extra_file
        )
        self.load_report["long_text"] = {"source": str(extra_file), "action": "loaded"}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        cfg: ModelConfig | None = None,
        map_location: str | torch.device = "cpu",
    ) -> FGCLIPVideoModel:
        """Reload a model written by ``save_pretrained`` (its saved scales are kept as they are).

        ``cfg`` defaults to the saved model config; a given one may change knobs such
        as ``logit_scale_max`` but not the head's architecture.
        """
        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: not an FG-CLIP model directory (missing {name})")
        saved = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        if saved.get("format_version", 1) != FORMAT_VERSION:
            raise OldModelFormatError(
                f"{path}: saved in model format {saved.get('format_version', 1)}, this version reads "
                f"{FORMAT_VERSION} (FG-CLIP's dense path, text tables and hard-negative scale): "
                "re-run the train stage"
            )
        saved_cfg = ModelConfig.model_validate(saved["model_config"])
        if cfg is None:
            cfg = saved_cfg
        else:
            differ = [k for k in _HEAD_KEYS if getattr(cfg, k) != getattr(saved_cfg, k)]
            if differ:
                raise ValueError(
                    f"{path}: model config differs from the saved model in "
                    + ", ".join(
                        f"{k} ({getattr(cfg, k)!r} vs saved {getattr(saved_cfg, k)!r})" for k in differ
                    )
                )
        model = cls(CLIPModel(CLIPConfig.from_dict(saved["clip_config"])), cfg)
        # Saved before pixel statistics were: those models were trained on CLIP's.
        model.pixel_stats = PixelStats.from_json(saved.get("pixel_stats", {}), str(path / CONFIG_NAME))
        state = load_file(str(path / WEIGHTS_NAME), device=str(map_location))
        model.load_state_dict(state, strict=True)
        model.to(map_location)
        model.load_report = {
            name: {"value": p.item(), "source": str(path), "action": "loaded"}
            for name, p in model.named_scales().items()
        }
        model.log_scales()
        return model

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write ``model.safetensors`` (whole state dict) and ``fgclip_config.json``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {
            "format_version": FORMAT_VERSION,
            "clip_config": self.clip.config.to_dict(),
            "model_config": self.cfg.model_dump(),
            "pixel_stats": self.pixel_stats.to_json(),
        }
        (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")

    def log_scales(self, source: str | os.PathLike | None = None) -> None:
        """The users' grep line for each scale: ``[global] Loaded logit_scale = 4.6052 (exp=100.0)``."""
        origin = f" from {source}" if source is not None else ""
        for name, scale in self.named_scales().items():
            logger.info("[%s] Loaded logit_scale = %s%s", name, _describe_scale(scale.item()), origin)

    def named_scales(self) -> dict[str, nn.Parameter]:
        """The stored (unclamped) scales by the names the logs and reports use."""
        return {
            "global": self.logit_scale_global,
            "region": self.logit_scale_region,
            "hardneg": self.logit_scale_hardneg,
        }

    def _add_long_text_path(self) -> None:
        """FG-CLIP's long-caption path beside the short one: its tables and its projection."""
        text = self.clip.text_model
        if isinstance(text.embeddings, LongTextEmbeddings):
            return  # a model already wrapped keeps its (trained) long tables and projection
        text.embeddings = LongTextEmbeddings(text.embeddings)
        # Inside the CLIP, under FG-CLIP's own name: its checkpoints map key for key.
        self.clip.text_filip_projection = copy.deepcopy(self.clip.text_projection)

    # ---------------------------------------------------------------- encoders

    def scales(self) -> LogitScales:
        """The logit scales clamped at ``cfg.logit_scale_max``, as the losses use them."""
        top = self.cfg.logit_scale_max
        return LogitScales(*(capped_logit_scale(s, top) for s in self.named_scales().values()))

    @torch.no_grad()
    def clamp_logit_scales_(self) -> None:
        """Keep the stored scales at most ``cfg.logit_scale_max``, as open_clip does after each step.

        The forward pass clamps too, but there the gradient above the cap is zero
        while Adam's momentum keeps pushing: the stored value would creep past ln 100
        and a checkpoint would report a temperature the model never used.
        """
        for scale in self.named_scales().values():
            scale.copy_(capped_logit_scale(scale, self.cfg.logit_scale_max))

    def _vision(
        self, pixel_values: torch.Tensor, with_hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One vision forward: projected CLS embeddings and (optionally) the penultimate hidden state."""
        out = self.clip.vision_model(pixel_values=pixel_values, output_hidden_states=with_hidden)
        embeds = self.clip.visual_projection(out.pooler_output)
        # hidden_states = (embeddings, layer 1, ..., layer L): [-2] is the input of the last block.
        return embeds, (out.hidden_states[-2] if with_hidden else None)

    def _dense(self, penultimate: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """FG-CLIP dense features: the last block with its attention reduced to the value path,
        then the post-layernorm; patches only."""
        vision = self.clip.vision_model
        last = vision.encoder.layers[-1]
        attn = last.self_attn
        # Each token attends to itself only: the value branch keeps the residual's scale
        # and what the block was trained to add, without mixing in the CLS summary or
        # other patches, which is what makes the tokens usable for RoI pooling.
        x = penultimate + attn.out_proj(attn.v_proj(last.layer_norm1(penultimate)))
        x = x + last.mlp(last.layer_norm2(x))
        x = vision.post_layernorm(x)
        return x[:, 1:].reshape(x.shape[0], grid[0], grid[1], x.shape[-1])

    def _grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        patch = self.clip.config.vision_config.patch_size
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    def encode_images(
        self, pixel_values: torch.Tensor, *, with_patches: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image projected embeddings ``[N, D]`` (unnormalised) and, if asked, dense patches ``[N, gh, gw, C]``."""
        embeds, penultimate = self._vision(pixel_values, with_patches)
        patches = self._dense(penultimate, self._grid(pixel_values)) if with_patches else None
        return embeds, patches

    def encode_video(self, frame_embeds: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` frame embeddings (normalised here, raw ones are fine) -> ``[B, D]`` L2-normalised."""
        return F.normalize(self.temporal(F.normalize(frame_embeds, dim=-1)), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, long: bool = False
    ) -> torch.Tensor:
        """``[N, L]`` token ids -> ``[N, D]`` L2-normalised (pooled at the EOS token by CLIP).

        ``long=True`` (global captions) takes FG-CLIP's long path when ``model.long_text``
        is on; otherwise, and for every short text, CLIP's own table and projection.
        """
        long = long and self.cfg.long_text
        projection = self.clip.text_filip_projection if long else self.clip.text_projection
        if input_ids.shape[0] == 0:
            # Empty, but in the graph of what the texts would have used: under DDP a rank
            # without regions must still run the gather's backward (a collective) and give
            # every parameter a gradient, the short path's too when captions take the long one.
            empty = projection(projection.weight.new_zeros((0, projection.in_features)))
            if self.cfg.long_text and not long:
                empty = empty + 0 * self.clip.text_model.embeddings.position_embedding.weight.sum()
            return F.normalize(empty, dim=-1)
        if long:
            with self.clip.text_model.embeddings.long_path():
                out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        else:
            out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(projection(out.pooler_output), dim=-1)

    def encode_hard_negatives(
        self, token_ids: torch.Tensor, text_mask: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        """``[M, N, L]`` hard-negative captions of M regions -> ``[M, N, D]`` (zero where not ``present``)."""
        m, n = present.shape
        out = self.clip.text_projection.weight.new_zeros((m, n, self.clip.config.projection_dim))
        if present.any():
            encoded = self.encode_text(token_ids[present], text_mask[present])
            out = out.index_put((present,), encoded.to(out.dtype))
        return out

    def encode_regions(
        self, patch_tokens: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Region embeddings from dense patch features.

        Args:
            patch_tokens: ``[B, K, gh, gw, C]`` dense features of K keyframes per video.
            boxes: ``[B, R, K, 4]`` normalised xyxy box of region r on keyframe k.
            box_mask: ``[B, R, K]`` True where that box exists.

        Returns:
            ``features [B, R, D]`` (L2-normalised; zero where invalid), ``valid [B, R]``
            (region has at least one box), and the fraction of valid regions whose
            projected feature has norm < 1e-6 before normalisation.
        """
        b, k, gh, gw, c = patch_tokens.shape
        r = boxes.shape[1]
        if boxes.shape != (b, r, k, 4) or box_mask.shape != (b, r, k):
            raise ValueError(
                f"boxes {tuple(boxes.shape)} / box_mask {tuple(box_mask.shape)} do not match "
                f"patch_tokens {tuple(patch_tokens.shape)} (want [B, R, K, 4] / [B, R, K])"
            )
        box_mask = box_mask.bool()
        # Missing boxes may hold padding garbage (even NaN): pool the whole frame
        # there instead, and drop the result below.
        whole = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
        safe = torch.where(box_mask[..., None], boxes, whole)
        maps = patch_tokens.permute(0, 1, 4, 2, 3).reshape(b * k, c, gh, gw)
        per_map = safe.permute(0, 2, 1, 3).reshape(b * k, r, 4)
        pooled = roi_align(
            maps, per_map, output_size=1, sampling_ratio=self.cfg.roi_sampling_ratio
        )  # [B*K, R, C, 1, 1]
        pooled = pooled.reshape(b, k, r, c).transpose(1, 2)  # [B, R, K, C]
        summed = torch.where(box_mask[..., None], pooled, torch.zeros_like(pooled)).sum(dim=2)
        counts = box_mask.sum(dim=2, keepdim=True).clamp(min=1).to(summed.dtype)
        projected = self.roi_projection(summed / counts)  # [B, R, D]
        valid = box_mask.any(dim=2)
        zero = (projected.detach().norm(dim=-1) < 1e-6) & valid
        zero_norm_frac = float(zero.sum()) / max(int(valid.sum()), 1)
        features = torch.where(valid[..., None], F.normalize(projected, dim=-1), torch.zeros_like(projected))
        return features, valid, zero_norm_frac

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Batch) -> FGCLIPOutput:
        """Encode a training batch (``fgclip.data.batch.Batch``) for ``FGCLIPLoss``."""
        frames, keyframes = batch.frames, batch.keyframes
        b, t = frames.shape[:2]
        k = keyframes.shape[1]
        if k == 0:
            raise ValueError(
                "batch has no keyframes: region features need at least one keyframe slot per video"
            )
        # Frames and keyframes share one vision forward (one large batch beats two).
        pixels = torch.cat([frames.flatten(0, 1), keyframes.flatten(0, 1)])
        embeds, penultimate = self._vision(pixels, with_hidden=True)
        video = self.encode_video(embeds[: b * t].view(b, t, -1))
        text = self.encode_text(batch.text_token_ids, batch.text_mask, long=True)

        # Only the keyframes need the dense path.
        patches = self._dense(penultimate[b * t :], self._grid(pixels))
        patches = patches.view(b, k, *patches.shape[1:])
        regions, box_valid, zero_norm_frac = self.encode_regions(patches, batch.boxes, batch.box_mask)
        keep = batch.region_mask.bool() & box_valid
        region_text = self.encode_text(batch.region_token_ids[keep], batch.region_text_mask[keep])
        negatives_present = batch.region_negative_mask[keep]
        hardneg_text = self.encode_hard_negatives(
            batch.region_negative_token_ids[keep], batch.region_negative_text_mask[keep], negatives_present
        )

        scales = self.scales()
        return FGCLIPOutput(
            video_embeds=video,
            text_embeds=text,
            caption_ids=batch.caption_ids,
            region_image_embeds=regions[keep],
            region_text_embeds=region_text,
            region_caption_ids=batch.region_caption_ids[keep],
            region_image_ids=batch.region_image_ids[keep],
            zero_norm_frac=zero_norm_frac,
            logit_scale_global=scales.glob,
            logit_scale_region=scales.region,
            logit_scale_hardneg=scales.hardneg,
            hardneg_text_embeds=hardneg_text,
            hardneg_mask=negatives_present,
        )
