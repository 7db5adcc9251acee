"""A pretrained directory transformers cannot load is one line naming it, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import CLIPConfig

from fgclip.errors import FGClipError
from fgclip.model.fgclip import CLIPLoadError, load_clip
from fgclip.model.tokenizer import TokenizerLoadError, load_tokenizer


def test_a_directory_without_weights_or_tokenizer_is_one_line(tmp_path: Path) -> None:
    CLIPConfig().save_pretrained(tmp_path)  # a real config.json, nothing else
    with pytest.raises(CLIPLoadError) as clip_err:
        load_clip(tmp_path)
    with pytest.raises(TokenizerLoadError) as tok_err:
        load_tokenizer(tmp_path)
    assert str(tok_err.value) == (
        f"{tmp_path}: no tokenizer in this model directory (no tokenizer_config.json or tokenizer.json)"
    )  # before: transformers built an empty CLIPTokenizer from config.json, every word <unk>
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError) as broken:
        load_tokenizer(tmp_path)
    for err, what in ((clip_err, "a CLIP model"), (broken, "a tokenizer")):
        message = str(err.value)
        assert message.startswith(f"{tmp_path}: cannot load {what}: ") and "\n" not in message
        # FGClipError: the CLI prints one line; OSError: callers that caught transformers' error still do.
        assert isinstance(err.value, FGClipError) and isinstance(err.value, OSError)
