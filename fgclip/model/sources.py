"""What ``model.pretrained`` names: a CLIP to load as it is, or weights to convert first.

A Hugging Face ``CLIPModel`` directory or hub id loads as it is. OpenAI's ``.pt``
files, open_clip checkpoints and FG-CLIP directories do not: loaded as a
``CLIPModel`` an FG-CLIP directory silently loses its region and hard-negative
scales and its long-caption tables. Those are converted by ``fgclip import-weights``
(:mod:`fgclip.model.import_weights`); when ``model.pretrained`` names one, the
``pretrain`` stage converts it once into its own output (``pretrain.out``) and
training and evaluation read that.

The conversion records where it came from (``import.json``): the source's path
and, for a file, its size and modification time, so that a conversion of another
file, or of an older version of this one, is refused instead of trained from.

Light on purpose (no torch): the CLI checks sources before it loads anything.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from fgclip.config import ModelSourceError, Params, check_model_source, model_source

REPORT_NAME = "import.json"
# FG-CLIP's own parameter names (FGCLIPModel), which a CLIPModel has no place for, and
# the names they take in ``fgclip_extra.safetensors`` (fgclip.model.fgclip.EXTRA_*).
FGCLIP_EXTRA = {
    "logit_scale_finegraind": "logit_scale_region",  # [sic]: FG-CLIP's spelling
    "logit_scale_hardneg": "logit_scale_hardneg",
    "text_model.embeddings.position_embedding_ori.weight": "position_embedding_ori",
    "text_model.embeddings.position_embedding_res.weight": "position_embedding_res",
    "text_filip_projection.weight": "text_filip_projection",
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on its JSON header


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file, from its JSON header alone (nothing else is read)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelSourceError(f"{path}: not a safetensors file (shorter than its header length)")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise ModelSourceError(f"{path}: not a safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ModelSourceError(f"{path}: not a safetensors file (unreadable header)") from exc
    if not isinstance(header, dict):
        raise ModelSourceError(f"{path}: not a safetensors file (header is not an object)")
    return [k for k in header if k != "__metadata__"]


def _weight_keys(directory: Path) -> set[str] | None:
    """The parameter names of a Hugging Face directory's safetensors weights; None without them."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"{index}: no readable weight_map") from exc
    single = directory / "model.safetensors"
    return set(safetensors_keys(single)) if single.is_file() else None


def conversion_needed(source: str | os.PathLike) -> str | None:
    """What ``source`` is when it must be converted before it is loaded; None when it loads as it is.

    A hub id or a path that does not exist is None here: :func:`check_model_source`
    says what is wrong with it.
    """
    found = model_source(source)
    if not isinstance(found, Path) or not found.exists():
        return None
    if found.is_file():
        return "a checkpoint file"
    if (found / "open_clip_config.json").is_file():
        return "an open_clip directory"
    if (found / "config.json").is_file() and not (found / REPORT_NAME).is_file():
        keys = _weight_keys(found) or set()
        if any(k in keys for k in FGCLIP_EXTRA):
            return "an FG-CLIP directory"
    return None


def source_stamp(source: str | os.PathLike, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a converted model came from: resolved path, size and mtime of the file or of each
    file at the top of the directory (a new revision downloaded into the same directory
    changes them), and the conversion options (format, arch, activation)."""
    path = Path(source).resolve()
    stamp: dict[str, Any] = {"path": str(path)}
    if path.is_file():
        st = path.stat()
        stamp |= {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    elif path.is_dir():
        stamp["files"] = {
            f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()
        }
    if options is not None:
        stamp["options"] = options
    return stamp


def check_converted(directory: Path, source: str | os.PathLike, options: dict[str, Any]) -> Path:
    """``directory``, made sure to hold the conversion of ``source`` as it is now, with ``options``."""
    rerun = "run the pretrain stage (dvc repro pretrain, or fgclip pretrain) to convert it"
    report_file = directory / REPORT_NAME
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
        stamp = report["source_stamp"]
    except FileNotFoundError:
        raise ModelSourceError(
            f"model.pretrained = {source} needs converting ({conversion_needed(source)}) and "
            f"{directory} holds no conversion: {rerun}"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelSourceError(f"{report_file}: not a conversion report ({exc!r}): {rerun}") from exc
    now = source_stamp(source, options)
    if stamp.get("path") != now["path"]:
        raise ModelSourceError(
            f"{directory} was converted from {stamp.get('path')}, but model.pretrained = {source}: {rerun}"
        )
    if stamp.get("options") != now["options"]:
        raise ModelSourceError(
            f"{directory} was converted with {stamp.get('options')}, but params say {now['options']}: {rerun}"
        )
    if stamp != now:
        raise ModelSourceError(f"{source} changed since {directory} was converted from it: {rerun}")
    return directory


def conversion_options(params: Params) -> dict[str, Any]:
    """The params a conversion of ``model.pretrained`` is made with (import-weights' options)."""
    m = params.model
    return {"format": m.pretrained_format, "arch": m.pretrained_arch, "activation": m.pretrained_activation}


def check_pretrained(params: Params, override: str | None = None) -> Path | str:
    """The CLIP to fine-tune from, made sure to be loadable (and, converted, current)."""
    source = params.pretrained_source(override)
    if override is None and params.model.pretrained is not None and source != params.model.pretrained:
        check_converted(Path(source), params.model.pretrained, conversion_options(params))
    elif override is not None and conversion_needed(override):
        raise ModelSourceError(
            f"{override} is {conversion_needed(override)}: convert it first "
            f"(fgclip import-weights {override} --out DIR) and give DIR"
        )
    return check_model_source(source)
