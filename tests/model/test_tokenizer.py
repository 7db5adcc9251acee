"""Word-level tokenizer: special ids, deterministic vocab, EOS kept on truncation."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from fgclip.model.tokenizer import build_tokenizer, character_inventory, load_tokenizer, tokenize


def test_special_ids_and_eos_is_not_two(tokenizer: PreTrainedTokenizerFast) -> None:
    assert (
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    ) == (
        0,
        1,
        2,
        3,
    )


def test_vocab_ordered_by_frequency_then_alphabet() -> None:
    tok = build_tokenizer(["b a c", "c b", "c", "Zed"])
    vocab = tok.get_vocab()
    # c x3, b x2, then a and zed (x1) alphabetically; "Zed" is lowercased. The CJK characters follow.
    assert [vocab[w] for w in ("c", "b", "a", "zed")] == [4, 5, 6, 7]
    assert len(tok) == 8 + len(character_inventory())
    assert vocab["一"] > 7
    assert build_tokenizer(["Zed", "c", "c b", "b a c"]).get_vocab() == vocab


def test_chinese_split_per_character_and_punctuation() -> None:
    tok = build_tokenizer(["男人打人.", "A Man"])
    tokens = tok.convert_ids_to_tokens(tok("男人打人.")["input_ids"])
    assert tokens == ["<|startoftext|>", "男", "人", "打", "人", ".", "<|endoftext|>"]
    assert tok("a man")["input_ids"] == tok("A MAN")["input_ids"]


def test_tokenize_pads_right_and_keeps_eos_when_truncating(tokenizer: PreTrainedTokenizerFast) -> None:
    ids, mask = tokenize(tokenizer, ["a man", "a man attacks a woman inside a shop", "a unicorn"], max_len=6)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 6)
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 1, 0, 0]]
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    last = mask.sum(1) - 1
    assert (ids[torch.arange(3), last] == tokenizer.eos_token_id).all()
    assert ids[0, 4:].tolist() == [tokenizer.pad_token_id] * 2
    # Truncation cut the caption, not the EOS: "a man attacks a" + EOS.
    assert tokenizer.convert_ids_to_tokens(ids[1, 1:5].tolist()) == ["a", "man", "attacks", "a"]
    assert ids[2, 2] == tokenizer.unk_token_id


def test_save_and_load_round_trip(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    texts = ["the woman falls", "一个男人 hits a car"]
    for a, b in zip(tokenize(tokenizer, texts, 10), tokenize(loaded, texts, 10)):
        assert torch.equal(a, b)
    assert loaded.eos_token_id == 3
