"""CLIP's own tokenizer: OpenAI's BPE vocabulary as a transformers tokenizer.

:func:`build_clip_tokenizer` reads OpenAI's merges file ``bpe_simple_vocab_16e6.txt.gz``
(the copy inside the ``openai-clip`` package unless a path is given) and builds the
vocabulary exactly as ``clip/simple_tokenizer.py`` builds its encoder: the 256 byte
symbols of GPT-2's byte-to-unicode table, the same 256 with ``</w>``, the first 48,894
merges after the header line (each merge's two halves joined), then ``<|startoftext|>``
(49406) and ``<|endoftext|>`` (49407): 49,408 entries. The result is a
:class:`~transformers.PreTrainedTokenizerFast` whose whole pipeline lives in
``tokenizer.json``, so ``save_pretrained`` + :func:`fgclip.model.tokenizer.load_tokenizer`
give it back unchanged. It is deliberately not a ``CLIPTokenizer``: transformers rebuilds
that class's normalizer in code on loading, and would drop the ftfy rules below.

Encodings are ``<|startoftext|> … <|endoftext|>``; the pad token is ``<|endoftext|>``
(49407). OpenAI's ``clip.tokenize`` pads with 0 instead; the pad positions are masked and
CLIP pools at the first EOS (transformers, ``eos_token_id != 2``) or at the largest id
(OpenAI's argmax, which also picks the first 49407), so the padding value changes nothing.
:func:`fgclip.model.tokenizer.tokenize` cuts a long caption like
``clip.tokenize(..., truncate=True)``: the first ``L - 1`` tokens, then EOS.

**What matches OpenAI's ``SimpleTokenizer`` exactly.** OpenAI cleans a caption with
``ftfy.fix_text``, then ``html.unescape`` twice, collapses whitespace and lowercases, then
splits and byte-pair-encodes it. The normalizer here does, in a serialisable pipeline:

1. HTML references for the characters of :data:`ENTITY_CHARS` (ASCII punctuation, the
   no-break space, dashes, curly quotes, ellipsis and common typographic signs): every
   HTML5 name that ends in ``;`` (``&amp;`` ``&rsquo;`` ``&nbsp;`` …), ftfy's all-caps
   variants (``&NBSP;``), and decimal or hexadecimal numeric references with any leading
   zeros (``&#39;`` ``&#039;`` ``&#x27;``), including the Windows-1252 ones
   (``&#146;`` = ’). ``&amp;`` is decoded three times first, so ``&amp;amp;quot;`` is ``"``.
2. ftfy's character fixes, composed per character as ftfy applies them
   (:func:`ftfy_char_map`, one ``Precompiled`` pass): C1 controls read as Windows-1252,
   Latin ligatures split (ﬁ → fi), half/full-width forms to their normal width
   (，→ ``,``, ＡＢ → AB, U+3000 → space), curly quotes uncurled, line breaks; then ANSI
   terminal escapes removed and the control characters ftfy removes deleted.
3. NFC, whitespace runs to one space, Greek capital sigma at a word end to ``ς`` (Python's
   ``str.lower`` final-sigma rule, which the ``Lowercase`` normalizer lacks), lowercase.

Then ``simple_tokenizer.py``'s split pattern, case-insensitive as OpenAI compiles it
(``'ſ`` is the contraction ``'s``; U+0345, which that pattern skips, separates tokens),
and byte-level BPE. The literal special tokens in a caption (``<|endoftext|>``, in any
case, as OpenAI matches them after lowercasing) are the special ids, as in OpenAI's.
Normalising costs about 60 µs per caption (the reference passes of step 1, mostly);
encoding is about 1.5 times transformers' own CLIP pipeline.

**Documented differences** (inputs where the ids can differ from OpenAI's; each is
tested in ``tests/model/test_clip_tokenizer.py``):

- *Mojibake*: ftfy's ``fix_encoding`` heuristics re-decode text that looks like UTF-8 read
  as Latin-1/Windows-1252 (``cafÃ©`` → ``café``, ``â€™`` → ``’``); here such text is
  tokenized as written.
- *HTML references outside step 1*: a name or number for any other character
  (``&eacute;`` ``&#233;``), a reference without its closing ``;`` (``&amp`` ``&#39``),
  ``&amp;`` nested more than three deep (``&amp;amp;amp;amp;`` is read as ``&amp;``), or
  a reference spelled in full-width characters (``＆amp;`` is read as ``&amp;``): OpenAI
  decodes them, here they stay as written.
- *A caption line containing ``<``*: from there on ftfy decodes no reference, and OpenAI's
  two ``html.unescape`` passes decode them after ftfy's fixes. So there, in OpenAI's, a
  reference to a character ftfy changes keeps it (``&rsquo;`` stays ``’``, not ``'``),
  ftfy's all-caps names (``&NBSP;``) stay as written, and ``&amp;`` nesting is decoded two
  levels deep only; here every line is decoded as in step 1.
- *Code points that Python's Unicode database does not assign* (Unicode 14.0 in Python
  3.11): the ``regex`` module OpenAI's code uses may know them from a newer Unicode version
  as letters, the tokenizers library's regex engine and lowercasing from another one.
  Every assigned character (BMP, emoji and tag planes) tokenizes as OpenAI's, alone and in
  context.
- *Lone surrogates* (a Python ``str`` from broken JSON escapes): the tokenizers library
  cannot take them (``TypeError``); ftfy replaces them.
"""

from __future__ import annotations

import gzip
import html
import html.entities
import importlib.metadata
import re
import struct
import unicodedata
import zlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fgclip.errors import FGClipError

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# The PyPI distribution that ships OpenAI's code and merges file (import name ``clip``).
OPENAI_CLIP_DISTRIBUTION = "openai-clip"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# simple_tokenizer.py keeps merges[1:49152-256-2+1]: the vocab is 49152 minus the 256 byte
# symbols and the two special tokens, counted once more with the ``</w>`` byte symbols.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
SOT_ID = VOCAB_SIZE - 2
EOT_ID = VOCAB_SIZE - 1
CONTEXT_LENGTH = 77
# simple_tokenizer.py's pattern (applied there with re.IGNORECASE to lowercased text).
SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# Characters whose HTML references are decoded (module docstring, step 1).
ENTITY_CHARS = "&<>\"'!#$%()*+,-./:;=?@[\\]^_`{|}~\xa0–—…‘’‚“”„‹›•·′″©®™°×÷«»€£¥¢§¶½¼¾±"
# ``&amp;`` is decoded this many times before the other references (nested escaping).
AMP_PASSES = 3

# ftfy.chardata.LIGATURES: Latin ligatures and digraphs ftfy splits.
_LIGATURES = {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}  # fmt: skip
# ftfy.chardata.CONTROL_CHARS: the control characters ftfy.fixes.remove_control_chars deletes.
_CONTROL_CHARS = (
    *range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
    *range(0xFFF9, 0xFFFD),
)  # fmt: skip
# ftfy.fixes.remove_terminal_escapes (Python's \d is any Nd digit).
_ANSI_ESCAPE = r"\x1b\[(?:\p{Nd}|;)*[a-zA-Z]"
# Python's final-sigma context: cased, case-ignorables, SIGMA, not (case-ignorables, cased).
_FINAL_SIGMA = r"(?<=\p{Cased}\p{Case_Ignorable}*)Σ(?!\p{Case_Ignorable}*\p{Cased})"


class ClipTokenizerError(FGClipError):
    """OpenAI's BPE merges file is missing or is not the file ``simple_tokenizer.py`` reads."""


def openai_bpe_path() -> Path:
    """The merges file inside the installed ``openai-clip`` package (found without importing ``clip``).

    ``clip/__init__.py`` imports torchvision, so the package is located through its
    distribution metadata, never imported.
    """
    try:
        dist = importlib.metadata.distribution(OPENAI_CLIP_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ClipTokenizerError(
            f"CLIP's tokenizer needs OpenAI's {BPE_FILENAME}: install the {OPENAI_CLIP_DISTRIBUTION} "
            "package (pip install openai-clip), or pass the file's path"
        ) from None
    path = Path(dist.locate_file(f"clip/{BPE_FILENAME}"))
    if not path.is_file():
        raise ClipTokenizerError(
            f"{OPENAI_CLIP_DISTRIBUTION} is installed but has no {path}: reinstall it, or pass the file's path"
        )
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table, in ``simple_tokenizer.py``'s order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_bpe(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (49,408 tokens → ids) and the 48,894 ranked merges, as OpenAI builds them."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            lines = fh.read().decode("utf-8").split("\n")
    except FileNotFoundError:
        raise ClipTokenizerError(f"{path}: no such BPE merges file (OpenAI's {BPE_FILENAME})") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ClipTokenizerError(f"{path}: not a gzipped UTF-8 BPE merges file ({exc})") from exc
    rows = lines[1 : NUM_MERGES + 1]
    merges = [tuple(row.split()) for row in rows]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None or len(merges) < NUM_MERGES:
        if bad is not None and any(merges[bad:]):
            found = f"line {bad + 2} is {rows[bad]!r}"
        else:  # the file ends early
            found = f"only {sum(1 for m in merges if m)} merge lines"
        raise ClipTokenizerError(
            f"{path}: not OpenAI's {BPE_FILENAME} ({NUM_MERGES} merge lines of two symbols after "
            f"a header line expected; {found})"
        )
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), SOT_TOKEN, EOT_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ClipTokenizerError(
            f"{path}: the merges give {len(vocab)} distinct tokens, not {VOCAB_SIZE}: not OpenAI's {BPE_FILENAME}"
        )
    return vocab, merges  # type: ignore[return-value]


def _cp1252(c: str) -> str:
    """ftfy's "sloppy" Windows-1252 reading of one C1 control (undefined bytes stay as they are)."""
    try:
        return bytes([ord(c)]).decode("cp1252")
    except UnicodeDecodeError:
        return c


def _width(c: str) -> str:
    """ftfy.fixes.fix_character_width for one character."""
    if c == "\u3000":
        return " "
    if 0xFF01 <= ord(c) < 0xFFF0:
        return unicodedata.normalize("NFKC", c)
    return c


def ftfy_char_fix(c: str) -> str:
    """What ftfy's character-level fixes make of the character ``c``, in ftfy's order.

    ``fix_c1_controls``, ``fix_latin_ligatures``, ``fix_character_width``, ``uncurl_quotes``,
    ``fix_line_breaks``, ``remove_control_chars`` (NFC comes later, in the normalizer).
    """
    s = _cp1252(c) if 0x80 <= ord(c) <= 0x9F else c
    s = "".join(_LIGATURES.get(ch, ch) for ch in s)
    s = "".join(_width(ch) for ch in s)
    s = re.sub("[\u201c-\u201f]", '"', re.sub("[\u02bc\u2018-\u201b]", "'", s))
    s = re.sub("[\r\u2028\u2029\x85]", "\n", s)
    return "".join(ch for ch in s if ord(ch) not in _CONTROL_CHARS)


def ftfy_char_map() -> dict[str, str]:
    """Every character ftfy's character fixes change, and what it becomes ("" = deleted)."""
    candidates = (
        *map(chr, range(0x80, 0xA0)),
        *_LIGATURES,
        "\u3000",
        *map(chr, range(0xFF01, 0xFFF0)),
        "\u02bc",
        *map(chr, range(0x2018, 0x2020)),
        "\r",
        "\u2028",
        "\u2029",
        *map(chr, _CONTROL_CHARS),
    )
    return {c: fixed for c in dict.fromkeys(candidates) if (fixed := ftfy_char_fix(c)) != c}


def _digits(number: int, base: int) -> str:
    """A regex for ``number`` in ``base`` (hex digits in either case)."""
    if base == 10:
        return str(number)
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{number:x}")


def html_entity_rules() -> dict[str, str]:
    """The HTML references decoded (module docstring, step 1): regex → character, ``&`` first."""
    names: dict[str, list[str]] = {c: [] for c in ENTITY_CHARS}
    html5 = html.entities.html5
    for name, char in html5.items():
        if not name.endswith(";"):
            continue
        if char in names:
            names[char].append(name[:-1])
        # ftfy.chardata: the all-caps spelling of a lowercase name, unless HTML5 has it.
        upper = name.upper()
        if name == name.lower() and upper not in html5 and char.upper() in names:
            names[char.upper()].append(upper[:-1])
    # The numbers html.unescape reads as another character (&#146; is ’, as in Windows-1252).
    read_as: dict[str, list[int]] = {}
    for n in range(0x100):
        if (char := html.unescape(f"&#{n};")) != chr(n):
            read_as.setdefault(char, []).append(n)
    rules: dict[str, str] = {}
    for char, char_names in names.items():
        numbers = [ord(char), *read_as.get(char, [])]
        alternatives = [
            *(re.escape(n) for n in sorted(set(char_names))),
            "#0*(?:" + "|".join(_digits(n, 10) for n in numbers) + ")",
            "#[xX]0*(?:" + "|".join(_digits(n, 16) for n in numbers) + ")",
        ]
        rules["&(?:" + "|".join(alternatives) + ");"] = char
    amp = next(rule for rule, char in rules.items() if char == "&")
    return {amp: "&", **rules}


def _char_class(chars: Iterable[str]) -> str:
    """A regex character class of ``chars``, as code point ranges."""
    points = sorted({ord(c) for c in chars})
    ranges: list[list[int]] = []
    for p in points:
        if ranges and p == ranges[-1][1] + 1:
            ranges[-1][1] = p
        else:
            ranges.append([p, p])
    return "[" + "".join(f"\\x{{{lo:x}}}" + (f"-\\x{{{hi:x}}}" if hi > lo else "") for lo, hi in ranges) + "]"


def precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """``mapping`` (one character → its replacement) as a SentencePiece "precompiled charsmap".

    The format the ``Precompiled`` normalizer reads: the trie's size in bytes (u32, little
    endian), a darts-clone double-array trie over the keys' UTF-8 bytes (u32 units: label in
    bits 0-7, has-leaf bit 8, offset to the children's block from bit 10; a leaf unit holds
    its value with bit 31 set), then the replacements, each ended by a NUL byte, that the
    values point into. One pass over the text replaces every key, where a chain of
    ``Replace`` normalizers would scan it once per key.
    """
    pool = bytearray()
    root: dict = {}
    for key, out in mapping.items():
        node = root
        for byte in key.encode():
            node = node.setdefault(byte, {})
        node[None] = len(pool)  # None: the key ends here; the value is its pool offset
        pool += out.encode() + b"\0"
    units = [0] * 512
    used, bases = {0}, set()
    queue = [(0, root)]
    while queue:
        pos, node = queue.pop(0)
        labels = [0 if label is None else label for label in node]
        base = 256
        while base in bases or any(base ^ label in used for label in labels):
            base += 1
        bases.add(base)
        # The search XORs a block's base with any byte: the array covers whole 256-blocks.
        units += [0] * max(0, (base | 255) + 1 - len(units))
        units[pos] |= (pos ^ base) << 10
        for label, child in node.items():
            child_pos = base ^ (0 if label is None else label)
            used.add(child_pos)
            if label is None:
                units[pos] |= 1 << 8
                units[child_pos] = child | (1 << 31)
            else:
                units[child_pos] = label
                queue.append((child_pos, child))
    return struct.pack(f"<I{len(units)}I", 4 * len(units), *units) + bytes(pool)


def clip_normalizer() -> normalizers.Normalizer:
    """OpenAI's ``basic_clean`` + ``whitespace_clean`` + ``lower`` (module docstring, steps 1-3)."""
    rules = list(html_entity_rules().items())
    steps: list[normalizers.Normalizer] = [normalizers.Replace(Regex(rules[0][0]), "&")] * AMP_PASSES
    steps += [normalizers.Replace(Regex(pattern), char) for pattern, char in rules[1:]]
    char_map = ftfy_char_map()
    replaced = {c: fixed for c, fixed in char_map.items() if fixed}
    deleted = [c for c, fixed in char_map.items() if not fixed]
    steps += [
        # Precompiled replaces a whole grapheme cluster by its first character's replacement
        # (a curly quote + combining mark would lose the mark): a NUL after every replaced
        # character ends its cluster, and goes with the deleted controls below.
        normalizers.Replace(Regex("(?<=" + _char_class(replaced) + ")"), "\0"),
        normalizers.Precompiled(precompiled_charsmap(replaced)),
        normalizers.Replace(Regex(_ANSI_ESCAPE), ""),
        normalizers.Replace(Regex(_char_class(["\0", *deleted])), ""),
        normalizers.NFC(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Replace(Regex(_FINAL_SIGMA), "ς"),
        normalizers.Lowercase(),
        # OpenAI's pattern, under re.IGNORECASE, matches U+0345 (a mark that case-folds to
        # the letter ι) with none of its classes: it only separates tokens, like a space.
        normalizers.Replace("\u0345", " "),
    ]
    return normalizers.Sequence(steps)


def build_clip_tokenizer(bpe_path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """CLIP's tokenizer from OpenAI's merges file (``openai-clip``'s copy when ``bpe_path`` is None).

    Token ids equal ``[49406] + SimpleTokenizer().encode(text) + [49407]`` (see the module
    docstring for the documented exceptions). Pad = EOS = ``<|endoftext|>`` (49407),
    ``model_max_length`` 77; save it with ``save_pretrained``.
    """
    path = Path(bpe_path) if bpe_path is not None else openai_bpe_path()
    vocab, merges = load_bpe(path)
    try:
        bpe = models.BPE(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOT_TOKEN
        )
    except Exception as exc:  # tokenizers raises a bare Exception for a merge outside the vocab
        raise ClipTokenizerError(f"{path}: the merges do not form a BPE vocabulary: {exc}") from exc
    tok = Tokenizer(bpe)
    tok.normalizer = clip_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # (?i): OpenAI compiles the pattern with re.IGNORECASE, so "'ſ" is the contraction 's.
            pre_tokenizers.Split(Regex("(?i)" + SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
        pair=f"{SOT_TOKEN} $A {EOT_TOKEN} $B {EOT_TOKEN}",
        special_tokens=[(SOT_TOKEN, SOT_ID), (EOT_TOKEN, EOT_ID)],
    )
    # normalized=True: matched after lowercasing, as OpenAI's pattern matches them.
    sot = AddedToken(SOT_TOKEN, special=True, normalized=True)
    eot = AddedToken(EOT_TOKEN, special=True, normalized=True)
    tok.add_special_tokens([sot, eot])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sot,
        eos_token=eot,
        pad_token=eot,
        unk_token=eot,
        model_max_length=CONTEXT_LENGTH,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
