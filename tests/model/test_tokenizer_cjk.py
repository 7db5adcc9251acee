"""Captions in Chinese (the users' may be), Japanese and Korean: distinct captions, distinct ids.

The stand-in's vocabulary comes from its corpus; the sample's is English. Before, every
character of a Chinese caption outside the corpus was `<|unk|>`, so the users' captions
all became `<|startoftext|> <|unk|> … <|endoftext|>`, told apart only by their length.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fgclip.model.tokenizer import build_tokenizer, load_tokenizer, tokenize

# The users' kind of captions (a global caption and its region captions), none of them in the corpus.
USERS_CAPTIONS = [
    "一个男人在商店里袭击一个女人",
    "一名男子抢走了女人的红色包",
    "另一个男人打她",
    "女人摔倒了",
    "两辆汽车在路口相撞",
    "一辆白色汽车撞上了另一辆汽车",
    "一个穿黑衣服的男人点燃了垃圾桶，火焰蔓延。",
    "两个男人在街上打架",
]
ENGLISH_CORPUS = ["a man attacks a woman inside a shop", "two cars collide on the road", "people walk"]


def test_chinese_captions_outside_the_corpus_get_one_distinct_id_per_character(tmp_path: Path) -> None:
    built = build_tokenizer(ENGLISH_CORPUS)  # what `pretrain` builds from the English sample
    built.save_pretrained(tmp_path)
    for tok in (built, load_tokenizer(tmp_path)):  # as saved in models/clip-pretrained and reloaded
        ids, _ = tokenize(tok, USERS_CAPTIONS, max_len=32)
        assert not (ids == tok.unk_token_id).any()
        assert len({tuple(row) for row in ids.tolist()}) == len(USERS_CAPTIONS)
        tokens = tok.convert_ids_to_tokens(tok(USERS_CAPTIONS[3])["input_ids"])
        assert tokens == ["<|startoftext|>", "女", "人", "摔", "倒", "了", "<|endoftext|>"]
        # Full-width punctuation is folded to its plain form; 。 is a token of its own.
        tail = tok.convert_ids_to_tokens(tok(USERS_CAPTIONS[6])["input_ids"])[-7:]
        assert tail == [",", "火", "焰", "蔓", "延", "。", "<|endoftext|>"]


def test_corpus_words_keep_their_ids_and_english_is_unchanged() -> None:
    tok = build_tokenizer(ENGLISH_CORPUS + ["男人"])
    vocab = tok.get_vocab()
    assert vocab["a"] == 4  # the corpus first (most frequent), the rest of the CJK inventory after it
    assert vocab["男"] < vocab["一"]  # 男 came from the corpus, 一 from the inventory
    ids, _ = tokenize(tok, ["A man attacks a woman inside a shop"], max_len=12)
    assert tok.decode(ids[0, 1:9].tolist()) == "a man attacks a woman inside a shop"


def test_japanese_and_korean_are_one_token_per_character_and_keep_their_marks() -> None:
    tok = build_tokenizer(ENGLISH_CORPUS)
    # BERT's accent stripping turned が into か and hangul syllables into loose jamo.
    pairs = [("がっこう", "かっこう"), ("バス", "ハス"), ("남자가 여자를 때린다", "남자가 여자를 밀었다")]
    for a, b in pairs:
        ids, _ = tokenize(tok, [a, b], max_len=16)
        assert not (ids == tok.unk_token_id).any(), (a, b)
        assert not torch.equal(ids[0], ids[1]), (a, b)
    assert tok.convert_ids_to_tokens(tok("バス")["input_ids"])[1:-1] == ["バ", "ス"]
    assert tok("３个人")["input_ids"] == tok("3个人")["input_ids"]  # full-width digits folded (NFKC)


def test_different_captions_with_identical_ids_are_reported(caplog) -> None:
    tok = build_tokenizer(ENGLISH_CORPUS)
    with caplog.at_level(logging.WARNING, logger="fgclip.model.tokenizer"):
        tokenize(tok, ["a man attacks", "A  man attacks", "people walk"], max_len=8)  # equal once normalised
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="fgclip.model.tokenizer"):
        tokenize(tok, ["a unicorn flies", "a dragon flies", "people walk"], max_len=8)
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith("1 group(s) of different captions get identical token ids")
    assert "'a dragon flies' / 'a unicorn flies'" in message
