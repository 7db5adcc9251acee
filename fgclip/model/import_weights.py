"""``fgclip import-weights``: OpenAI, open_clip and FG-CLIP checkpoints as a directory ``model.pretrained`` reads.

The output is a Hugging Face ``CLIPModel`` directory (``config.json`` +
``model.safetensors``), CLIP's BPE tokenizer, a ``preprocessor_config.json`` and,
for FG-CLIP sources, ``fgclip_extra.safetensors``: the parts a ``CLIPModel`` has
no place for (region and hard-negative logit scales, the 248-entry long-caption
position tables and their projection), which ``FGCLIPVideoModel.from_clip``
loads instead of re-initialising them. ``import.json`` says what was read and how.

Sources:

- **OpenAI** (``--format openai``): a released ``.pt`` file (a TorchScript archive,
  read with ``torch.jit.load``) or a plain state dict of the same keys. The
  architecture is read from the shapes as OpenAI's ``clip.model.build_model``
  does (heads = width // 64); the activation is QuickGELU.
- **open_clip** (``--format open_clip``): a ``.pt``/``.bin`` state dict (possibly under
  ``state_dict``, possibly with DDP's ``module.`` prefix), a ``.safetensors`` file, or
  a hub directory with ``open_clip_config.json``. Same keys as OpenAI's for the ViT
  CLIP models. The activation is not in the weights and a wrong one still runs, so
  it is never guessed: it comes from ``open_clip_config.json``, the architecture name
  (``--arch ViT-B-32-quickgelu``: QuickGELU; ``--arch ViT-B-32``: GELU) or
  ``--activation``, else the import stops and says so.
- **FG-CLIP** (``--format fgclip``): a Hugging Face directory of FG-CLIP's
  ``FGCLIPModel`` (``config.json`` + weights with CLIP's keys and
  ``logit_scale_finegraind`` [sic], ``logit_scale_hardneg``, ``text_filip_projection``,
  ``position_embedding_ori``/``_res``).

Pickles are read with ``torch.load(weights_only=True)`` and nothing else: a file
that needs more is refused. ``torch.jit.load`` runs no Python code but does build
the archive's TorchScript program: import archives only from a source you trust.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from fgclip.data.images import CLIP_PIXELS, PREPROCESSOR_NAME, PixelStats, read_pixel_stats
from fgclip.errors import FGClipError
from fgclip.model.fgclip import (
    CLIP_TEXT_POSITIONS,
    EXTRA_LONG_KEYS,
    EXTRA_NAME,
    EXTRA_SCALE_KEYS,
    LONG_TEXT_POSITIONS,
)
from fgclip.model.sources import FGCLIP_EXTRA, REPORT_NAME, source_stamp
from fgclip.outputs import check_output_dir, replacing_output_dir

logger = logging.getLogger(__name__)

STAGE = "import_weights"
FORMATS = ("auto", "openai", "open_clip", "fgclip")
ACTIVATIONS = ("gelu", "quick_gelu")
# open_clip's vision towers whose heads are not 64 wide (model_configs/*.json, head_width):
# the shapes cannot tell 20 heads of 64 from 16 of 80.
_OPEN_CLIP_HEAD_WIDTH = {"H": 80, "g": 88, "bigG": 104, "G": 104}
_NON_64_WIDTHS = {1280: "H", 1408: "g", 1664: "bigG"}
# Tensors in OpenAI's archives (and some state dicts) that are settings, not weights.
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
_ARCH = re.compile(r"ViT-(?P<family>[A-Za-z]+)-(?P<patch>\d+)(?P<rest>.*)")


class WeightsImportError(FGClipError, ValueError):
    """A source that cannot be imported: not a checkpoint, an unknown layout, missing keys."""


class UnsafePickleError(WeightsImportError):
    """A pickle that stores more than tensors: reading it would run code from the file."""


@dataclass
class _Arch:
    """What the weights do not say: the activation and the head widths, and where each came from."""

    activation: str | None = None
    activation_from: str = ""
    vision_head_width: int | None = None
    text_heads: int | None = None
    heads_from: str = ""
    patch_size: int | None = None
    name: str | None = None
    pixels: PixelStats = CLIP_PIXELS


@dataclass
class _Converted:
    clip: CLIPModel
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    pixels: PixelStats = CLIP_PIXELS


# ------------------------------------------------------------------ reading files


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip with a ``code/`` folder, unlike ``torch.save``'s."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def _load_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except (RuntimeError, ValueError, OSError) as exc:
        raise WeightsImportError(f"{path}: not a readable TorchScript archive: {_first_line(exc)}") from exc


def _pickle_globals(path: Path) -> list[str] | None:
    """The Python names a pickle file refers to, read without unpickling (None: not a pickle).

    ``torch.save``'s zip keeps its pickle in ``*/data.pkl``. Opcodes are only parsed
    (``pickletools``), never run.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not members:
                return None
            data = archive.read(members[0])
    else:
        data = path.read_bytes()
    stream, names, strings, parsed = io.BytesIO(data), [], [], 0
    while stream.tell() < len(data):
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings = [*strings[-1:], arg]
                elif opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                    names.append(".".join(strings))
        except (
            ValueError,
            EOFError,
            IndexError,
            UnicodeDecodeError,
            OverflowError,
        ):  # not a pickle (any more)
            break
        parsed += 1
    return sorted(set(names)) if parsed else None


def _load_pickle(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _pickle_globals(path)
        if names is None:
            raise WeightsImportError(f"{path}: not a PyTorch checkpoint (not a pickle)") from exc
        # What weights_only refused: the names outside torch's own tensor rebuilding.
        foreign = [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]
        shown = f" ({', '.join(foreign[:3])})" if foreign else ""
        raise UnsafePickleError(
            f"{path}: the pickle stores Python objects{shown}, not only tensors, and is read with "
            "weights_only=True only; load it where you trust it and re-save its state dict "
            "(torch.save(model.state_dict(), ...)) or convert it to .safetensors"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise WeightsImportError(f"{path}: not a PyTorch checkpoint ({_first_line(exc)})") from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsImportError(f"{path}: not a safetensors file ({_first_line(exc)})") from exc


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint file's tensors and what the file was (``torchscript``, ``safetensors``, ``pickle``)."""
    if path.suffix == ".safetensors":
        return _load_safetensors(path), "safetensors"
    if is_torchscript(path):
        return _load_torchscript(path), "torchscript"
    return _state_dict(_load_pickle(path), path), "pickle"


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle: a state dict, or a training checkpoint holding one under ``state_dict``."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        raise WeightsImportError(f"{path}: holds no state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsImportError(f"{path}: holds no tensors")
    # DDP-wrapped training saves every key under `module.`.
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def _load_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face directory: one or sharded safetensors, else a weights_only pickle."""
    for index_name, loader in (
        ("model.safetensors.index.json", _load_safetensors),
        ("pytorch_model.bin.index.json", lambda p: _state_dict(_load_pickle(p), p)),
    ):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _state_dict(_load_pickle(directory / "pytorch_model.bin"), directory / "pytorch_model.bin")
    raise WeightsImportError(f"{directory}: no model.safetensors or pytorch_model.bin beside config.json")


# ------------------------------------------------------------- OpenAI key layout

_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # [sic]: transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# Stored as x @ proj ([in, out]); a Linear's weight is [out, in].
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def _block_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    if not found:
        return 0
    if found != set(range(len(found))):
        raise WeightsImportError(
            f"residual blocks {prefix}N are not numbered 0..{len(found) - 1}: {sorted(found)}"
        )
    return len(found)


def _heads(width: int, head_width: int, what: str) -> int:
    if width % head_width:
        raise WeightsImportError(f"{what} width {width} is not a multiple of the head width {head_width}")
    return width // head_width


def convert_openai_state_dict(
    state: Mapping[str, torch.Tensor], arch: _Arch, source: str
) -> tuple[CLIPConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """OpenAI's (and open_clip's ViT) CLIP keys -> a ``CLIPConfig`` and ``CLIPModel`` keys (float32).

    The shapes give the architecture, as ``clip.model.build_model`` reads it; every
    key must be used exactly once, so a layout with more (layer scale, attention
    pooling, biased projections) is refused instead of loaded half-way.
    """
    state = {k: v for k, v in state.items() if k not in _NOT_WEIGHTS and not k.endswith("attn_mask")}
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state):
        raise WeightsImportError(
            f"{source}: a ResNet CLIP (visual.layer1, visual.attnpool): only ViT CLIPs map onto "
            "transformers' CLIPModel"
        )
    required = [*_TOP, *_TRANSPOSED]
    missing = [k for k in required if k not in state]
    if missing:
        if not any(k in state for k in required):
            raise WeightsImportError(
                f"{source}: not OpenAI's CLIP key layout (none of visual.conv1.weight, token_embedding.weight, "
                f"...; it has {', '.join(sorted(state)[:3])}, ...)"
            )
        raise WeightsImportError(f"{source}: missing keys of OpenAI's CLIP layout: {', '.join(missing[:6])}")

    conv = state["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != patch:
        raise WeightsImportError(
            f"{source}: visual.conv1.weight has shape {tuple(conv.shape)}, not [W, 3, P, P]"
        )
    grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise WeightsImportError(
            f"{source}: visual.positional_embedding has {state['visual.positional_embedding'].shape[0]} rows, "
            "not a square grid + 1"
        )
    if arch.patch_size is not None and arch.patch_size != patch:
        raise WeightsImportError(
            f"{source}: patch size {patch} in the weights, {arch.patch_size} in --arch {arch.name}"
        )
    embed_dim = state["text_projection"].shape[1]
    text_width = state["ln_final.weight"].shape[0]
    vocab = state["token_embedding.weight"].shape[0]
    context = state["positional_embedding"].shape[0]
    vision_layers = _block_count(state, "visual.transformer.resblocks.")
    text_layers = _block_count(state, "transformer.resblocks.")
    if not vision_layers or not text_layers:
        raise WeightsImportError(
            f"{source}: no residual blocks (visual.transformer.resblocks.N / transformer.resblocks.N)"
        )

    if arch.vision_head_width is None and vision_width in _NON_64_WIDTHS:
        family = _NON_64_WIDTHS[vision_width]
        raise WeightsImportError(
            f"{source}: vision width {vision_width} is open_clip's ViT-{family}, whose heads are "
            f"{_OPEN_CLIP_HEAD_WIDTH[family]} wide, not 64: give --arch (e.g. ViT-{family}-14)"
        )
    vision_heads = _heads(vision_width, arch.vision_head_width or 64, "vision")
    text_heads = arch.text_heads or _heads(text_width, 64, "text")

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str, transpose: bool = False) -> None:
        tensor = state[src]
        out[dst] = (tensor.t() if transpose else tensor).float().contiguous()
        used.add(src)

    for src, dst in _TOP.items():
        take(src, dst)
    for src, dst in _TRANSPOSED.items():
        take(src, dst, transpose=True)
    intermediate = {}
    for tower, src_prefix, dst_prefix, layers in (
        ("vision", "visual.transformer.resblocks.", "vision_model.encoder.layers.", vision_layers),
        ("text", "transformer.resblocks.", "text_model.encoder.layers.", text_layers),
    ):
        for i in range(layers):
            s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            block_keys = [s + k for k in (*_BLOCK, "attn.in_proj_weight", "attn.in_proj_bias")]
            lacking = [k for k in block_keys if k not in state]
            if lacking:
                raise WeightsImportError(
                    f"{source}: missing keys of OpenAI's CLIP layout: {', '.join(lacking[:6])}"
                )
            for src, dst in _BLOCK.items():
                take(s + src, d + dst)
            # nn.MultiheadAttention stacks q, k, v in one projection.
            for name in ("weight", "bias"):
                stacked = state[f"{s}attn.in_proj_{name}"].float()
                for part, chunk in zip(("q", "k", "v"), stacked.chunk(3, dim=0), strict=True):
                    out[f"{d}self_attn.{part}_proj.{name}"] = chunk.contiguous()
                used.add(f"{s}attn.in_proj_{name}")
        intermediate[tower] = state[f"{src_prefix}0.mlp.c_fc.weight"].shape[0]
    unknown = sorted(set(state) - used)
    if unknown:
        raise WeightsImportError(
            f"{source}: keys outside OpenAI's ViT CLIP layout ({len(unknown)}: {', '.join(unknown[:4])}"
            f"{', ...' if len(unknown) > 4 else ''}): another architecture, not imported"
        )

    config = CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": text_width,
            "intermediate_size": intermediate["text"],
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_heads,
            "max_position_embeddings": context,
            "hidden_act": arch.activation,
            "projection_dim": embed_dim,
        },
        vision_config={
            "image_size": patch * grid,
            "patch_size": patch,
            "hidden_size": vision_width,
            "intermediate_size": intermediate["vision"],
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "hidden_act": arch.activation,
            "projection_dim": embed_dim,
        },
        projection_dim=embed_dim,
        logit_scale_init_value=float(state["logit_scale"]),
    )
    described = {
        "embed_dim": embed_dim,
        "image_size": patch * grid,
        "patch_size": patch,
        "vision": {
            "width": vision_width,
            "layers": vision_layers,
            "heads": vision_heads,
            "mlp": intermediate["vision"],
        },
        "text": {
            "width": text_width,
            "layers": text_layers,
            "heads": text_heads,
            "mlp": intermediate["text"],
            "context_length": context,
            "vocab_size": vocab,
        },
        "heads_from": arch.heads_from or "width // 64 (OpenAI's build_model)",
        "dtype": str(state["visual.conv1.weight"].dtype).removeprefix("torch."),
    }
    return config, out, described


# ------------------------------------------------------------------ architecture


def _arch_from_name(name: str) -> _Arch:
    """open_clip's model name: ``-quickgelu`` means QuickGELU; the family gives the vision head width."""
    found = _ARCH.fullmatch(name)
    if found is None:
        raise WeightsImportError(
            f"--arch {name}: not an open_clip ViT name (ViT-B-32, ViT-L-14-quickgelu, ...); "
            "ResNet, ConvNeXt, EVA and SigLIP towers do not map onto transformers' CLIPModel"
        )
    quick = found["rest"].endswith("-quickgelu")
    family = found["family"]
    return _Arch(
        activation="quick_gelu" if quick else "gelu",
        activation_from=f"--arch {name}" + (" (-quickgelu)" if quick else " (no -quickgelu suffix: GELU)"),
        vision_head_width=_OPEN_CLIP_HEAD_WIDTH.get(family, 64),
        heads_from=f"--arch {name} (ViT-{family}: {_OPEN_CLIP_HEAD_WIDTH.get(family, 64)}-wide heads)",
        patch_size=int(found["patch"]),
        name=name,
    )


_OPEN_CLIP_VISION = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_OPEN_CLIP_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def _arch_from_open_clip_config(path: Path) -> _Arch:
    """``open_clip_config.json`` of a hub directory: activation, head widths, normalisation."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        model_cfg = doc["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsImportError(
            f"{path}: not an open_clip config (no model_cfg): {_first_line(exc)}"
        ) from exc
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    # Options that change the computation without changing a key: refused, not ignored.
    odd = sorted(
        [f"vision_cfg.{k}" for k in set(vision) - _OPEN_CLIP_VISION]
        + [f"text_cfg.{k}" for k in set(text) - _OPEN_CLIP_TEXT]
        + [k for k in ("custom_text",) if model_cfg.get(k)]
    )
    if odd:
        raise WeightsImportError(f"{path}: open_clip options this import does not map: {', '.join(odd)}")
    preprocess = doc.get("preprocess_cfg", {})
    return _Arch(
        activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        activation_from=f"{path.name} (quick_gelu: {bool(model_cfg.get('quick_gelu'))})",
        vision_head_width=int(vision.get("head_width", 64)),
        text_heads=int(text.get("heads", 8)),  # open_clip's CLIPTextCfg default
        heads_from=path.name,
        patch_size=vision.get("patch_size"),
        name=doc.get("model_name"),
        pixels=_open_clip_pixels(preprocess, path),
    )


def _open_clip_pixels(preprocess: Any, path: Path) -> PixelStats:
    """``preprocess_cfg``'s ``mean``/``std`` (open_clip's names); absent = CLIP's."""
    if not isinstance(preprocess, dict):
        raise WeightsImportError(f"{path}: preprocess_cfg must be an object")
    try:
        return PixelStats(
            tuple(preprocess.get("mean", CLIP_PIXELS.mean)), tuple(preprocess.get("std", CLIP_PIXELS.std))
        )
    except (TypeError, ValueError) as exc:
        raise WeightsImportError(f"{path}: preprocess_cfg: {exc}") from exc


def _with_activation(arch: _Arch, activation: str | None) -> _Arch:
    if activation is None:
        return arch
    if activation not in ACTIVATIONS:
        raise WeightsImportError(f"--activation {activation}: choose one of {', '.join(ACTIVATIONS)}")
    if arch.activation is not None and arch.activation != activation:
        raise WeightsImportError(
            f"--activation {activation} contradicts {arch.activation_from}, which means {arch.activation}"
        )
    arch.activation, arch.activation_from = activation, arch.activation_from or f"--activation {activation}"
    return arch


# ---------------------------------------------------------------------- sources


def _openai(path: Path, state: dict[str, torch.Tensor], kind: str, activation: str | None) -> _Converted:
    if activation not in (None, "quick_gelu"):
        raise WeightsImportError(
            f"--activation {activation}: OpenAI's CLIP weights were trained with QuickGELU"
        )
    arch = _Arch(activation="quick_gelu", activation_from="OpenAI's CLIP (QuickGELU)")
    config, weights, described = convert_openai_state_dict(state, arch, str(path))
    return _Converted(
        _build_clip(config, weights, str(path)),
        report={
            "format": "openai",
            "file": kind,
            "arch": described,
            "activation": arch.activation,
            "activation_from": arch.activation_from,
        },
    )


def _open_clip(
    path: Path, state: dict[str, torch.Tensor], kind: str, arch: _Arch, activation: str | None
) -> _Converted:
    arch = _with_activation(arch, activation)
    if arch.activation is None:
        raise WeightsImportError(
            f"{path}: an open_clip state dict does not say whether it uses GELU or QuickGELU, and a wrong "
            "one runs silently: give --arch (its open_clip name, e.g. ViT-B-32 or ViT-B-32-quickgelu) "
            "or --activation gelu|quick_gelu"
        )
    config, weights, described = convert_openai_state_dict(state, arch, str(path))
    return _Converted(
        _build_clip(config, weights, str(path)),
        report={
            "format": "open_clip",
            "file": kind,
            "arch": described,
            "arch_name": arch.name,
            "activation": arch.activation,
            "activation_from": arch.activation_from,
        },
        pixels=arch.pixels,
    )


def _fgclip(directory: Path, state: dict[str, torch.Tensor]) -> _Converted:
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsImportError(
            f"{directory / 'config.json'}: not readable JSON: {_first_line(exc)}"
        ) from exc
    if not isinstance(raw.get("text_config"), dict) or not isinstance(raw.get("vision_config"), dict):
        raise WeightsImportError(f"{directory / 'config.json'}: no text_config / vision_config of a CLIP")
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    extra = {dst: state.pop(src).float().contiguous() for src, dst in FGCLIP_EXTRA.items() if src in state}
    if not extra:
        raise WeightsImportError(
            f"{directory}: a plain CLIPModel directory (none of FG-CLIP's logit_scale_finegraind, "
            "logit_scale_hardneg, text_filip_projection, position_embedding_ori/_res): give it to "
            "model.pretrained as it is"
        )
    absent = sorted(set(FGCLIP_EXTRA.values()) - set(extra))
    if absent:
        names = {v: k for k, v in FGCLIP_EXTRA.items()}
        raise WeightsImportError(
            f"{directory}: FG-CLIP weights without {', '.join(names[a] for a in absent)}"
        )
    short = state.get("text_model.embeddings.position_embedding.weight")
    if short is None:
        raise WeightsImportError(f"{directory}: no text_model.embeddings.position_embedding.weight")
    width = short.shape[1]
    for name in ("position_embedding_ori", "position_embedding_res"):
        if tuple(extra[name].shape) != (LONG_TEXT_POSITIONS, width):
            raise WeightsImportError(
                f"{directory}: {name} has shape {tuple(extra[name].shape)}, FG-CLIP's is [{LONG_TEXT_POSITIONS}, {width}]"
            )
    if short.shape[0] != CLIP_TEXT_POSITIONS:
        raise WeightsImportError(
            f"{directory}: the short position table has {short.shape[0]} rows, FG-CLIP's has {CLIP_TEXT_POSITIONS}"
        )
    # FG-CLIP's config may name the long length here; the CLIP's own table is the short one.
    raw["text_config"]["max_position_embeddings"] = short.shape[0]
    for key in ("architectures", "auto_map", "_name_or_path"):
        raw.pop(key, None)
    raw["model_type"] = "clip"
    config = CLIPConfig.from_dict(raw)
    if "logit_scale" in state:
        config.logit_scale_init_value = float(state["logit_scale"])
    weights = {k: v.float().contiguous() for k, v in state.items()}
    clip = _build_clip(config, weights, str(directory))
    if tuple(extra["text_filip_projection"].shape) != tuple(clip.text_projection.weight.shape):
        raise WeightsImportError(
            f"{directory}: text_filip_projection has shape {tuple(extra['text_filip_projection'].shape)}, "
            f"text_projection {tuple(clip.text_projection.weight.shape)}"
        )
    try:
        pixels = read_pixel_stats(directory)
    except FGClipError as exc:
        raise WeightsImportError(str(exc)) from exc
    text, vision = clip.config.text_config, clip.config.vision_config
    described = {
        "embed_dim": clip.config.projection_dim,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "vision": {
            "width": vision.hidden_size,
            "layers": vision.num_hidden_layers,
            "heads": vision.num_attention_heads,
            "mlp": vision.intermediate_size,
        },
        "text": {
            "width": text.hidden_size,
            "layers": text.num_hidden_layers,
            "heads": text.num_attention_heads,
            "mlp": text.intermediate_size,
            "context_length": text.max_position_embeddings,
            "vocab_size": text.vocab_size,
        },
        "heads_from": "config.json",
        "dtype": str(short.dtype).removeprefix("torch."),
    }
    return _Converted(
        clip,
        extra=extra,
        report={
            "format": "fgclip",
            "file": "huggingface",
            "arch": described,
            "activation": vision.hidden_act,
            "activation_from": "config.json",
        },
        pixels=pixels,
    )


def _build_clip(config: CLIPConfig, weights: dict[str, torch.Tensor], source: str) -> CLIPModel:
    with torch.device("meta"):
        # No random init of weights that are about to be replaced (ViT-L: seconds).
        clip = CLIPModel(config)
    expected = {k: v.shape for k, v in clip.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing {', '.join(missing[:4])}" if missing else "",
            f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
        ]
        raise WeightsImportError(
            f"{source}: weights do not fit a CLIPModel: {'; '.join(p for p in parts if p)}"
        )
    wrong = [
        f"{k} {tuple(weights[k].shape)} (want {tuple(s)})"
        for k, s in expected.items()
        if weights[k].shape != s
    ]
    if wrong:
        raise WeightsImportError(f"{source}: weights of the wrong shape: {', '.join(wrong[:3])}")
    clip.load_state_dict(weights, strict=True, assign=True)
    # The non-persistent position ids were built on the meta device and are in no state dict.
    for module in clip.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise WeightsImportError(
                    f"{source}: transformers' CLIPModel has a buffer {name} this import cannot fill"
                )
            module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return clip.eval()


def detect(src: Path, fmt: str, arch_name: str | None, activation: str | None) -> _Converted:
    """Read ``src`` as ``fmt`` (``auto``: from what the file or directory holds) and convert it."""
    if fmt not in FORMATS:
        raise WeightsImportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if src.is_dir():
        if (src / "open_clip_config.json").is_file():
            if fmt not in ("auto", "open_clip"):
                raise WeightsImportError(f"{src}: an open_clip directory (open_clip_config.json), not {fmt}")
            arch = _arch_from_open_clip_config(src / "open_clip_config.json")
            if arch_name is not None:
                raise WeightsImportError(f"{src}: open_clip_config.json gives the architecture; drop --arch")
            for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                if (src / name).is_file():
                    state, kind = _load_file(src / name)
                    return _open_clip(src / name, state, kind, arch, activation)
            raise WeightsImportError(f"{src}: no open_clip_model.safetensors or open_clip_pytorch_model.bin")
        if (src / "config.json").is_file():
            if fmt not in ("auto", "fgclip"):
                raise WeightsImportError(
                    f"{src}: a Hugging Face directory (config.json); its format is fgclip"
                )
            return _fgclip(src, _load_hf_weights(src))
        raise WeightsImportError(f"{src}: a directory without config.json or open_clip_config.json")
    if fmt == "fgclip":
        raise WeightsImportError(
            f"{src}: FG-CLIP weights are a Hugging Face directory (config.json + weights)"
        )
    state, kind = _load_file(src)
    if fmt == "openai" or (
        fmt == "auto" and (kind == "torchscript" or any(k in state for k in _NOT_WEIGHTS))
    ):
        if arch_name is not None:
            raise WeightsImportError(
                "--arch names an open_clip architecture; OpenAI's is read from the weights"
            )
        return _openai(src, state, kind, activation)
    arch = _arch_from_name(arch_name) if arch_name is not None else _Arch()
    if fmt == "auto" and arch.activation is None and activation is None:
        raise WeightsImportError(
            f"{src}: a state dict in OpenAI's key layout; say what it is: --format openai (OpenAI's "
            "weights: QuickGELU), or for open_clip --arch NAME (e.g. ViT-B-32, ViT-B-32-quickgelu) or "
            "--activation gelu|quick_gelu"
        )
    return _open_clip(src, state, kind, arch, activation)


# ----------------------------------------------------------------------- writing


def _preprocessor_config(size: int, pixels: PixelStats) -> dict[str, Any]:
    """CLIPImageProcessor's file: resize the short side to ``size`` (bicubic), centre-crop, normalise."""
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(pixels.mean),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(pixels.std),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }


def _attach_tokenizer(clip: CLIPModel, out: Path) -> dict[str, Any]:
    """CLIP's BPE tokenizer beside the weights; the text config takes its special ids."""
    from fgclip.model.clip_tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    text = clip.config.text_config
    if len(tokenizer) != text.vocab_size:
        raise WeightsImportError(
            f"the text tower has {text.vocab_size} token embeddings, CLIP's BPE tokenizer {len(tokenizer)}: "
            "not a CLIP vocabulary"
        )
    # transformers pools CLIP text at the first eos_token_id (OpenAI: the argmax id, the same token).
    text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(str(out))
    return {
        "kind": "openai-clip BPE",
        "vocab_size": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }


def import_weights(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "auto",
    arch: str | None = None,
    activation: str | None = None,
    tokenizer: bool = True,
    stage: str = STAGE,
) -> dict[str, Any]:
    """Convert ``src`` into the model directory ``out`` (replaced whole, or left as it was on an error).

    ``tokenizer=False`` leaves CLIP's tokenizer out (tests of the weights alone).
    ``stage`` is the output's owner (``fgclip.outputs``): the pretrain stage converts
    ``model.pretrained`` into its own output. Returns the ``import.json`` report.
    """
    src, out = Path(src), Path(out)
    check_output_dir(out, stage, {"SRC": src})  # before minutes of reading a large checkpoint
    converted = detect(src, fmt, arch, activation)
    clip = converted.clip
    scales = {"global": clip.logit_scale.item()}
    for name, key in EXTRA_SCALE_KEYS.items():
        scales[name] = converted.extra[key].item() if key in converted.extra else None
    report: dict[str, Any] = {
        "source": str(src),
        "source_stamp": source_stamp(src, {"format": fmt, "arch": arch, "activation": activation}),
        **converted.report,
        "scales": scales,
        "long_text_tables": all(k in converted.extra for k in EXTRA_LONG_KEYS),
        "image": {
            "size": clip.config.vision_config.image_size,
            "mean": list(converted.pixels.mean),
            "std": list(converted.pixels.std),
        },
    }
    if converted.pixels != CLIP_PIXELS:
        logger.info(
            "%s normalises images with mean %s / std %s, not CLIP's: written to %s, which training "
            "and evaluation read",
            src,
            list(converted.pixels.mean),
            list(converted.pixels.std),
            PREPROCESSOR_NAME,
        )
    with replacing_output_dir(out, stage, {"SRC": src}) as tmp:
        report["tokenizer"] = _attach_tokenizer(clip, tmp) if tokenizer else None
        clip.save_pretrained(str(tmp), safe_serialization=True)
        if converted.extra:
            save_file(converted.extra, str(tmp / EXTRA_NAME), metadata={"format": "pt", "source": str(src)})
        size = clip.config.vision_config.image_size
        processor = _preprocessor_config(size, converted.pixels)
        (tmp / PREPROCESSOR_NAME).write_text(
            json.dumps(processor, indent=2) + "\n", encoding="utf-8"
        )
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shown = ", ".join(f"{k}={v:.4f}" for k, v in scales.items() if v is not None)
    logger.info(
        "imported %s (%s, %s) into %s: logit scales %s",
        src,
        report["format"],
        report["activation"],
        out,
        shown,
    )
    return {"out": str(out), **report}
