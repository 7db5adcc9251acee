"""Word-level tokenizer for the embedded CLIP stand-in, and caption tokenization.

The stand-in CLIP is trained from scratch on the project's own captions, so a
BPE vocabulary of 49k entries would be mostly dead weight. A word-level vocab
built from the captions (and prompts) is small and exact. Its EOS id is 3, not 2:
transformers' CLIP text model falls back to the legacy "argmax over token ids"
pooling when ``eos_token_id == 2``, which only works for OpenAI's vocab where EOS
happens to be the largest id.

Chinese, Japanese and Korean captions are one token per character, and every
character of those scripts is in every vocabulary (:data:`CJK_RANGES`), not only
the ones the corpus used, and so are ASCII digits and punctuation (full-width forms
fold into them): a stand-in built from English captions (the sample) would otherwise
turn any Chinese caption into ``<|unk|>`` only, so distinct captions got identical ids.
"""

from __future__ import annotations

import logging
import os
import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fgclip.errors import FGClipError

PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Ids 0..3 in this order; EOS must never be 2 (see the module docstring).
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
# Scripts written without spaces between words (or, for Korean, in syllable blocks): one
# token per character, and all of their characters in the vocabulary (about 32k entries).
CJK_RANGES = (
    (0x3000, 0x303F),  # CJK symbols and punctuation (。、「」)
    (0x3040, 0x30FF),  # Japanese hiragana and katakana
    (0x4E00, 0x9FFF),  # CJK unified ideographs: Chinese hanzi, Japanese kanji
    (0xAC00, 0xD7A3),  # Korean hangul syllables
)
# Kana and hangul are split here; BertNormalizer's handle_chinese_chars splits the ideographs.
_KANA_HANGUL = Regex("[\u3040-\u30ff\uac00-\ud7a3]")

logger = logging.getLogger(__name__)


def _word_splitter() -> Tokenizer:
    """The normalizer + pre-tokenizer pair, shared by vocab building and encoding."""
    tok = Tokenizer(models.WordLevel({UNK_TOKEN: 0}, unk_token=UNK_TOKEN))
    # NFKC folds full-width forms (１２ＡＢ，) into their plain ones. strip_accents=False:
    # BERT's accent stripping decomposes (NFD) and drops combining marks, which turns
    # が into か and hangul syllables into loose jamo: distinct captions, equal tokens.
    # handle_chinese_chars puts spaces around CJK ideographs: a Chinese caption
    # becomes one token per character, the usual word unit without a segmenter.
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True
            ),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Split(_KANA_HANGUL, behavior="isolated")]
    )
    return tok


def character_inventory() -> list[str]:
    """The single characters every vocabulary holds: ASCII digits and punctuation, then :data:`CJK_RANGES`."""
    cjk = (chr(c) for lo, hi in CJK_RANGES for c in range(lo, hi + 1))
    return [*string.digits, *string.punctuation, *cjk]


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocab is every word of ``texts`` and every CJK character.

    Words are ordered by decreasing frequency, then alphabetically, so the same
    texts always give the same ids; the characters of :func:`character_inventory`
    that ``texts`` did not use follow, in that order. Encodings are
    ``<|startoftext|> … <|endoftext|>``.
    """
    splitter = _word_splitter()
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = splitter.normalizer.normalize_str(text)
        counts.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized))
    for special in SPECIAL_TOKENS:
        counts.pop(special, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    words += [c for c in character_inventory() if c not in counts]
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.normalizer = splitter.normalizer
    tok.pre_tokenizer = splitter.pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="right",
        truncation_side="right",
    )


# What ``save_pretrained`` of any Hugging Face tokenizer writes.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class TokenizerLoadError(FGClipError, OSError):
    """A saved tokenizer that transformers could not load (an OSError, as transformers raises)."""


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a saved tokenizer: a local directory or a hub id (``openai/clip-vit-base-patch32``)."""
    local = Path(name_or_path)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone: every word <unk>.
        raise TokenizerLoadError(
            f"{local}: no tokenizer in this model directory (no {' or '.join(TOKENIZER_FILES)})"
        )
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as exc:
        # transformers' own text runs to several lines; its first one says what is missing.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerLoadError(f"{name_or_path}: cannot load a tokenizer: {first}") from exc


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Tokenize ``texts`` to right-padded ``(input_ids, attention_mask)`` of shape ``[N, max_len]``.

    CLIP pools the text at the EOS token, so a caption cut at ``max_len`` must
    still end with EOS: the last real token of every row is set to EOS (a no-op
    for rows the tokenizer already ended with it).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; CLIP pools text at EOS")
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
        padding_side="right",
    )
    input_ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    last = mask.sum(dim=1) - 1
    has_tokens = last >= 0
    rows = torch.arange(input_ids.shape[0])[has_tokens]
    input_ids[rows, last[has_tokens]] = tokenizer.eos_token_id
    _warn_identical(tokenizer, list(texts), input_ids, max_len)
    return input_ids, mask


def _warn_identical(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], ids: torch.Tensor, max_len: int
) -> None:
    """Say so when captions that differ (after normalisation) get identical ids.

    The losses tell captions apart by their text, the text encoder only by its ids:
    such captions are positives the model cannot distinguish.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = backend.normalizer if backend is not None else None
    by_row: dict[tuple[int, ...], set[str]] = {}
    for text, row in zip(texts, ids.tolist()):
        key = " ".join((normalizer.normalize_str(text) if normalizer else text.lower()).split())
        by_row.setdefault(tuple(row), set()).add(key)
    clashes = [sorted(group) for group in by_row.values() if len(group) > 1]
    if clashes:
        logger.warning(
            "%d group(s) of different captions get identical token ids (%s for words outside the "
            "tokenizer's vocabulary, or cut at model.max_text_len=%d tokens), e.g. %s",
            len(clashes),
            tokenizer.unk_token,
            max_len,
            " / ".join(repr(t) for t in clashes[0][:2]),
        )
