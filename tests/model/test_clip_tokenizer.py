"""CLIP's own tokenizer: OpenAI's vocabulary, and token ids equal to OpenAI's own code.

The reference is the ``openai-clip`` package: ``clip/simple_tokenizer.py`` loaded by file
path, and ``clip.tokenize``'s source run on it (``clip/__init__.py`` imports torchvision,
which does not import beside this torch build, so the package is never imported).
"""

from __future__ import annotations

import ast
import gzip
import html
import html.entities
import importlib.metadata
import importlib.util
import time
import unicodedata
from pathlib import Path
from types import ModuleType
from typing import Union

import packaging.version
import pytest
import torch
from tokenizers import normalizers
from transformers import PreTrainedTokenizerFast

from fgclip.model import clip_tokenizer
from fgclip.model.clip_tokenizer import (
    ENTITY_CHARS,
    EOT_ID,
    SOT_ID,
    VOCAB_SIZE,
    ClipTokenizerError,
    build_clip_tokenizer,
    ftfy_char_map,
    load_bpe,
    openai_bpe_path,
    precompiled_charsmap,
)
from fgclip.model.tokenizer import load_tokenizer, tokenize

try:
    CLIP_DIR = openai_bpe_path().parent
except ClipTokenizerError:
    CLIP_DIR = None
needs_openai_clip = pytest.mark.skipif(CLIP_DIR is None, reason="the openai-clip package is not installed")

# The caption classes of the parity test; every one matches OpenAI's ids exactly.
CAPTIONS = [
    "A man in a RED shirt punches the cashier, then runs!!!",
    "a surveillance video of Arson",
    "It's 3:45pm; they'll've gone... didn't they? (No.) #crime @2024 $100.50 50% off",
    "don't DON'T Don’t “quoted” ‘single’ „low“ ‹angle› it‛s ʼokʼ",
    "   lots \t of\n\nwhite\r\nspace\u3000here\u00a0too\u2028and\u2029there  ",
    "Tom &amp; Jerry &lt;b&gt; &quot;hi&quot; &#39;ok&#39; &#039;x&#039; &#x27;y&#X27; &apos;z&apos;",
    "&nbsp;a&NBSP;b &rsquo;s &ldquo;x&rdquo; &hellip; &mdash; &#8211; &#146;s &#x2019; &amp;amp;quot;",
    "AT&T Q&A R&D fish&chips rock&roll 5 & 6 &&& &; &#; &#x;",
    "ﬁne ﬂower ﬃ ĳ ǅemal ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３，！？ ﾀｰﾝ ｶﾞ ￡",
    "\x1b[31mred\x1b[0m text\x00with\x07controls\ufeff and \x85 \x91c1\x92 \x9d",
    "一个男人在商店里打了收银员，然后跑了。",
    "男子持刀抢劫便利店（监控画面）：“快把钱交出来！”",
    "日本語のテキスト、カタカナ 한국어 텍스트",
    "emoji 🙂👍🏽 👨‍👩‍👧 🇺🇸 ❤️ fire🔥🔥 ☕️",
    "ΟΔΟΣ ΣΟΦΟΣ Σ. Straße İstanbul café naïve Ångström e\u0301 ᾼ",
    "numbers 1234567890 ١٢٣ ⅷ ² ½ 3.14159 1,000,000",
    "<|startoftext|> literal <|endoftext|> and <|ENDOFTEXT|> inside",
    "it'ſ Kelvin \u212a \u0345 ﬅ",
    # A character ftfy changes, then a combining mark (one grapheme cluster): the mark stays.
    "Ａ\u0301 ’\u0308s ﬁ\u0301 \u3000\u0301 ｶﾞ ｶ\u3099 \ufffc\u0301 ＡＢ\u200d",
    " ".join(["a man walks into a store and looks around carefully before approaching the counter"] * 30),
    "word " * 300,
    "supercalifragilisticexpialidocious" * 20,
    "",
    "   ",
    "!!!",
]


def _load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai() -> ModuleType:
    """OpenAI's ``clip/simple_tokenizer.py``, loaded by path."""
    return _load_module(CLIP_DIR / "simple_tokenizer.py", "_openai_simple_tokenizer")


@pytest.fixture(scope="module")
def simple(openai: ModuleType):
    return openai.SimpleTokenizer(str(CLIP_DIR / clip_tokenizer.BPE_FILENAME))


@pytest.fixture(scope="module")
def openai_tokenize(simple):
    """OpenAI's own ``clip.tokenize``: its source, run on ``simple`` (no torchvision import)."""
    for name in ("__init__.py", "clip.py"):
        tree = ast.parse((CLIP_DIR / name).read_text())
        found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tokenize"]
        if found:
            break
    else:
        pytest.fail(f"no tokenize function in {CLIP_DIR}/__init__.py or clip.py")
    namespace = {"torch": torch, "packaging": packaging, "Union": Union, "List": list, "_tokenizer": simple}
    code = compile(ast.Module(body=found, type_ignores=[]), str(CLIP_DIR / name), "exec")
    exec(code, namespace)  # noqa: S102 - OpenAI's own tokenize, from the installed package
    return namespace["tokenize"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_clip_tokenizer()


def _ours(tok: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Our ids without the start and end tokens (no padding, no truncation)."""
    return [ids[1:-1] for ids in tok(texts, padding=False, truncation=False)["input_ids"]]


def _assert_same(tok, simple, texts: list[str]) -> None:
    ours = _ours(tok, texts)
    diffs = [(t, o, simple.encode(t)) for t, o in zip(texts, ours) if o != simple.encode(t)]
    assert not diffs, f"{len(diffs)} text(s) differ from OpenAI's, e.g. {diffs[:3]}"


@needs_openai_clip
def test_vocabulary_is_openai_encoder(tok, simple, openai) -> None:
    vocab, merges = load_bpe(CLIP_DIR / clip_tokenizer.BPE_FILENAME)
    assert vocab == simple.encoder and len(vocab) == VOCAB_SIZE == 49408
    assert dict(zip(merges, range(len(merges)))) == simple.bpe_ranks and len(merges) == 48894
    assert clip_tokenizer.bytes_to_unicode() == openai.bytes_to_unicode()
    assert tok.get_vocab() == simple.encoder and len(tok) == VOCAB_SIZE
    assert (
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        == (SOT_ID, EOT_ID, EOT_ID)
        == (49406, 49407, 49407)
    )
    assert tok.model_max_length == 77


@needs_openai_clip
@pytest.mark.parametrize("length", [77, 248])
def test_tokenize_equals_openai_clip_tokenize(tok, simple, openai_tokenize, length: int) -> None:
    ids, mask = tokenize(tok, CAPTIONS, length)
    ref = openai_tokenize(CAPTIONS, context_length=length, truncate=True).long()
    assert ids.shape == mask.shape == ref.shape == (len(CAPTIONS), length)
    # OpenAI pads with 0 (also the id of "!"): its rows' lengths come from its tokenizer.
    ref_len = torch.tensor([min(len(simple.encode(c)) + 2, length) for c in CAPTIONS])
    assert mask.sum(1).tolist() == ref_len.tolist()
    assert (ref[torch.arange(length) >= ref_len[:, None]] == 0).all()
    assert (ids[mask.bool()] == ref[mask.bool()]).all(), [
        (c[:40], i[m.bool()].tolist()[:12], r[m.bool()].tolist()[:12])
        for c, i, m, r in zip(CAPTIONS, ids, mask, ref)
        if not torch.equal(i[m.bool()], r[m.bool()])
    ][:3]
    # The long captions were cut: EOS last, as OpenAI's truncate=True leaves them.
    assert (ref_len == length).sum() >= 2
    # Right padding with EOS (OpenAI pads with 0, masked either way): the first EOS of a row
    # is its last real token, where transformers' CLIP pools (eos_token_id != 2), and it is
    # the argmax, where OpenAI's CLIP pools.
    assert (ids[~mask.bool()] == EOT_ID).all()
    plain = torch.tensor(["<|" not in c for c in CAPTIONS])
    first_eos = (ids == EOT_ID).int().argmax(1)
    assert (first_eos == mask.sum(1) - 1)[plain].all()
    assert (ids.argmax(1) == first_eos)[plain].all()


@needs_openai_clip
def test_html_references_of_the_table(tok, simple) -> None:
    """Every HTML5 name, ftfy's all-caps name and numeric spelling of each ENTITY_CHARS character."""
    texts = []
    for name, char in html.entities.html5.items():
        if name.endswith(";") and char in ENTITY_CHARS:
            texts += [f"x&{name}y", f"&{name.upper()}", f"&amp;{name}", f"&amp;amp;{name}"]
            if char != "&":  # &amp; itself is decoded three times (four levels are documented)
                texts.append(f"&amp;amp;amp;{name}")
    for char in ENTITY_CHARS:
        n = ord(char)
        texts += [f"a&#{n};b", f"a&#0{n};b", f"&#000{n};", f"a&#x{n:x};b", f"&#X{n:X};", f"&#x00{n:X};"]
    # Windows-1252 numbers: &#146; is ’.
    texts += [f"it&#{n};s" for n in range(0x80, 0xA0) if html.unescape(f"&#{n};") in ENTITY_CHARS]
    _assert_same(tok, simple, texts)


def test_precompiled_charsmap_replaces_exactly_its_keys() -> None:
    mapping = {"a": "", "é": "e\u0301", "’": "'", "ｶ": "カ", "🙂": ":)", "\U0010fffd": "x"}
    normalizer = normalizers.Precompiled(precompiled_charsmap(mapping))
    for cp in (*range(1, 0xD800), *range(0xE000, 0x10000), 0x1F642, 0x10FFFD):
        c = chr(cp)
        assert normalizer.normalize_str(c) == mapping.get(c, c), f"U+{cp:04X}"


def test_ftfy_char_map_equals_ftfy() -> None:
    """The per-character fixes equal ftfy's own, for every character ftfy changes alone."""
    ftfy = pytest.importorskip("ftfy")
    config = ftfy.TextFixerConfig(unescape_html=False, fix_encoding=False, normalization=None, explain=False)
    expected = {}
    for cp in (*range(0xD800), *range(0xE000, 0x10000)):
        c = chr(cp)
        if (fixed := ftfy.fix_text(c, config)) != c:
            expected[c] = fixed
    assert ftfy_char_map() == expected


@needs_openai_clip
def test_every_character(tok, simple) -> None:
    """Every BMP character (and the emoji and tag planes) alone, between letters, and after "'".

    The only differences are code points Python's Unicode database does not assign
    (unicodedata 14.0 in Python 3.11): the ``regex`` module OpenAI's code uses knows newer
    Unicode versions than the tokenizers library does, so it may call such a character a
    letter where ours sees a symbol (module docstring).
    """
    blocks = [
        range(0x100),  # one text per character: joined, ASCII and Latin-1 could look like mojibake
        *(range(lo, lo + 128) for lo in range(0x100, 0xD800, 128)),  # the rest 128 to a text
        *(range(lo, lo + 128) for lo in range(0xE000, 0x10000, 128)),
        *(range(lo, lo + 128) for lo in range(0x1F000, 0x1FB00, 128)),
        range(0xE0000, 0xE0080),
    ]
    different: set[int] = set()
    for block in blocks:
        for context in ("a{}b", "{}", "'{}"):
            texts = [context.format(chr(c)) for c in block]
            joined = " ".join(texts)
            if block[0] > 0 and _ours(tok, [joined])[0] == simple.encode(joined):
                continue
            failing = {c for c, t, o in zip(block, texts, _ours(tok, texts)) if o != simple.encode(t)}
            assert failing or block[0] == 0, f"a block differs as a whole only: {joined!r}"
            different |= failing
    assigned = sorted(f"U+{c:04X}" for c in different if unicodedata.category(chr(c)) != "Cn")
    assert not assigned, f"characters Python's Unicode database assigns differ: {assigned[:20]}"


@needs_openai_clip
def test_documented_differences(tok, simple, openai, monkeypatch) -> None:
    """The module docstring's list, input by input: what our tokenizer reads instead."""
    ftfy = openai.ftfy

    def read_as(text: str, cleaned: str) -> None:
        """Ours tokenizes ``text`` as OpenAI's would ``cleaned`` without HTML decoding or mojibake repair."""
        plain = ftfy.TextFixerConfig(unescape_html=False, fix_encoding=False)
        with monkeypatch.context() as m:
            m.setattr(openai, "basic_clean", lambda t: ftfy.fix_text(t, plain).strip())
            raw = openai.SimpleTokenizer(str(CLIP_DIR / clip_tokenizer.BPE_FILENAME))
            expected = raw.encode(cleaned)
        assert _ours(tok, [text])[0] == expected != simple.encode(text), text

    # Mojibake: ftfy's fix_encoding re-decodes it; ours keeps it as written.
    for text in ("cafÃ©", "donâ€™t stop", "Ã  la carte"):
        read_as(text, text)
    # HTML references outside the table, without ";", four deep, or in full-width letters.
    read_as("caf&eacute; &#233;t&#xE9;", "caf&eacute; &#233;t&#xE9;")
    read_as("AT&amp T R&#39s &copy 2020", "AT&amp T R&#39s &copy 2020")
    read_as("x &amp;amp;amp;amp; y", "x &amp; y")
    read_as("＆amp;", "&amp;")
    # A line with "<": OpenAI decodes references after ftfy's fixes (’ stays curly), knows no
    # all-caps names and decodes &amp; twice; ours decodes as everywhere else.
    for text, ours_reads in (
        ("it&rsquo;s <b>bold</b>", "it’s <b>bold</b>"),  # ftfy uncurls the literal ’
        ("&#8220;hi&#8221; <3", "“hi” <3"),
        ("&NBSP;x <", "\xa0x <"),
        ("&amp;amp;lt; <", "< <"),
        ("first <\nsecond &rsquo;", "first <\nsecond ’"),
    ):
        assert _ours(tok, [text])[0] == simple.encode(ours_reads) != simple.encode(text), text
    # Lines before the first "<" are decoded by ftfy too: no difference there.
    _assert_same(tok, simple, ["first &rsquo;\nsecond <", "a &ldquo;b&rdquo;\r\nc<d"])
    # Lone surrogates: the tokenizers library cannot take them.
    with pytest.raises(TypeError):
        tokenize(tok, ["broken \ud83d escape"], 77)


@needs_openai_clip
def test_save_pretrained_and_load_tokenizer(tok, simple, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (SOT_ID, EOT_ID, EOT_ID)
    assert len(loaded) == VOCAB_SIZE and loaded.model_max_length == 77
    for length in (77, 248):
        a, b = tokenize(tok, CAPTIONS, length), tokenize(loaded, CAPTIONS, length)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _assert_same(loaded, simple, CAPTIONS)
    assert loaded.decode(loaded("A photo of a Cat, 男人 🙂!")["input_ids"], skip_special_tokens=True) == (
        "a photo of a cat , 男人 🙂!"
    )


@needs_openai_clip
def test_builds_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    build_clip_tokenizer(CLIP_DIR / clip_tokenizer.BPE_FILENAME)
    assert time.perf_counter() - start < 10


def _write_gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wb") as fh:
        fh.write(text.encode("utf-8"))
    return path


def test_bad_merges_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ClipTokenizerError, match="no such BPE merges file"):
        build_clip_tokenizer(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt").write_text("#version: 0.2\ni n\n")
    with pytest.raises(ClipTokenizerError, match="not a gzipped UTF-8"):
        build_clip_tokenizer(tmp_path / "plain.txt")
    with pytest.raises(ClipTokenizerError, match="only 2 merge lines"):
        build_clip_tokenizer(_write_gz(tmp_path / "short.txt.gz", "#version: 0.2\ni n\nt h\n"))
    bad_row = "#version: 0.2\n" + "i n\n" * 10 + "oops\n" + "t h\n" * 48894
    with pytest.raises(ClipTokenizerError, match="line 12 is 'oops'"):
        build_clip_tokenizer(_write_gz(tmp_path / "row.txt.gz", bad_row))
    repeated = "#version: 0.2\n" + "i n\n" * 48894
    with pytest.raises(ClipTokenizerError, match="distinct tokens"):
        build_clip_tokenizer(_write_gz(tmp_path / "repeated.txt.gz", repeated))


def test_without_openai_clip_the_error_says_what_to_install(monkeypatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(clip_tokenizer.importlib.metadata, "distribution", missing)
    with pytest.raises(ClipTokenizerError, match="pip install openai-clip"):
        build_clip_tokenizer()
