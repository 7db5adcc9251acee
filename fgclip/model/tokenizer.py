"""Word-level tokenizer for the embedded CLIP stand-in, and caption tokenization.

The stand-in CLIP is trained from scratch on the project's own captions, so a
BPE vocabulary of 49k entries would be mostly dead weight. A word-level vocab
built from the captions (and prompts) is small and exact. Its EOS id is 3, not 2:
transformers' CLIP text model falls back to the legacy "argmax over token ids"
pooling when ``eos_token_id == 2``, which only works for OpenAI's vocab where EOS
happens to be the largest id.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Ids 0..3 in this order; EOS must never be 2 (see the module docstring).
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)


def _word_splitter() -> Tokenizer:
    """The normalizer + pre-tokenizer pair, shared by vocab building and encoding."""
    tok = Tokenizer(models.WordLevel({UNK_TOKEN: 0}, unk_token=UNK_TOKEN))
    # handle_chinese_chars puts spaces around CJK characters: a Chinese caption
    # becomes one token per character, the usual word unit without a segmenter.
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocab is every word of ``texts``.

    Words are ordered by decreasing frequency, then alphabetically, so the same
    texts always give the same ids. Encodings are ``<|startoftext|> … <|endoftext|>``.
    """
    splitter = _word_splitter()
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = splitter.normalizer.normalize_str(text)
        counts.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized))
    for special in SPECIAL_TOKENS:
        counts.pop(special, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))
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


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a saved tokenizer: a local directory or a hub id (``openai/clip-vit-base-patch32``)."""
    return AutoTokenizer.from_pretrained(str(name_or_path))


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
    return input_ids, mask
