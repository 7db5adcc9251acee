"""Hard-negative captions per region: the given ones validated, the missing ones generated.

FG-CLIP v1's third loss scores each box against its positive caption and 10 negative ones
(an 11-way cross-entropy). ``annotations.json`` may give them (``region_negatives``, one list
per region); a region without them gets negatives generated from the dataset itself.

**Generated negatives** swap ONE attribute word of the region caption (a colour, a number,
an object, an action) for another word of the same class that the dataset's own captions
use (global and region captions of every record: the vocabulary). Words are matched
case-insensitively (ASCII words whole, a few Chinese colour and number words as
substrings); every other character of the caption is kept as written, except that an
"a"/"an" right before the swapped word follows the new word ("an orange car"). Each class
lists its words by *sense*: the words of one sense (inflections, near-synonyms:
``fire``/``flames``, ``street``/``streets``) never replace each other, nor does a word
replace one its sense covers (``person`` covers ``man``, ``street`` covers ``sidewalk``):
either would make a negative that is still true. A negative never equals, after
whitespace and case normalisation, a true caption of the same video (its global caption
or any region caption of the record). A record without boxes (a normal video: every
region is the whole frame, which shows everything the video's captions name) also never
swaps in a word its own captions use: "a person in blue walks" is true of the whole frame
of a video whose other walker wears blue, whatever the other region's wording.

At most ``per_region`` negatives are picked, by a generator seeded from a blake2b hash of
(video, region, caption): the same file gives the same negatives in every run and process.
Picks go round-robin over the caption's swappable words in a seeded order, so ten
negatives are not ten colour swaps; each word tries a word of its own kind first (a man
for a woman before a man for a street: the harder negative), and of its grammatical form
(a plural for a plural, "walks" for "runs") before any other: an ungrammatical negative is
given away by its text alone, so it only fills what the grammatical ones leave. A caption
with fewer candidates keeps what there is.

**Given negatives** are kept as written and in their order, all of them (no cap), less the
invalid ones, each of which becomes a reject row (``NEGATIVE_REASONS``): blank strings,
strings equal to a true caption of the video (the positive included), repeats. A region
whose given negatives are all invalid, or malformed (annotations.py), falls back to
generated ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa

from fgclip.data.annotations import NEGATIVES_KEY, AnnotationRecord, Malformed
from fgclip.data.layout import BOX_COORDS, REJECTS_SCHEMA

# Reject reasons of given negatives (rows of rejects.parquet, counted apart from box rows).
NEGATIVE_REASONS = (
    "negatives_malformed",  # region_negatives, or one region's entry, of the wrong shape (annotations.py)
    "negative_blank",  # an empty or whitespace-only string
    "negative_true_caption",  # equals a true caption of the video: its global or a region caption
    "negative_duplicate",  # repeats an earlier negative of the same region
)
NEGATIVES_TYPE = pa.list_(pa.string())

# Where a region's negatives come from.
NONE, GIVEN, GENERATED = 0, 1, 2

# Class -> kind -> senses. Each tuple is one sense, named by its first word: inflections and
# near-synonyms that never replace each other. A swap prefers a word of the same kind
# (a man for a woman, not for a street): those negatives are the hard ones.
LEXICON: dict[str, dict[str, tuple[tuple[str, ...], ...]]] = {
    "colour": {
        "colour": (
            ("red",),
            ("green",),
            ("blue",),
            ("yellow",),
            ("white",),
            ("black", "dark"),
            ("purple", "violet"),
            ("orange",),
            ("grey", "gray"),
            ("brown",),
            ("pink",),
            ("bright",),
            ("silver",),
            ("gold", "golden"),
        )
    },
    "number": {  # listed from one up: a number word's value is its sense's place
        "number": (
            ("one",),
            ("two", "both"),
            ("three",),
            ("four",),
            ("five",),
            ("six",),
            ("seven",),
            ("eight",),
            ("nine",),
            ("ten",),
            ("eleven",),
            ("twelve",),
        )
    },
    "object": {
        "human": (
            ("person", "persons", "people", "someone", "pedestrian", "pedestrians"),
            ("man", "men", "guy", "guys"),
            ("woman", "women", "lady", "ladies"),
            ("child", "children", "kid", "kids"),
            ("boy", "boys"),
            ("girl", "girls"),
        ),
        "vehicle": (
            ("vehicle", "vehicles"),
            ("car", "cars"),
            ("truck", "trucks", "lorry"),
            ("bus", "buses"),
            ("van", "vans"),
            ("motorcycle", "motorcycles", "motorbike", "scooter"),
            ("bicycle", "bicycles", "bike", "bikes"),
        ),
        "fire": (
            ("fire", "fires", "flame", "flames", "blaze"),
            ("smoke",),
            ("explosion", "explosions", "blast"),
        ),
        "place": (
            ("street", "streets"),
            ("road", "roads"),
            ("sidewalk", "sidewalks", "pavement"),
            ("building", "buildings"),
            ("shop", "shops", "store", "stores"),
            ("house", "houses"),
            ("room",),
        ),
        "thing": (
            ("door", "doors"),
            ("window", "windows"),
            ("bag", "bags", "handbag", "purse"),
            ("box", "boxes"),
            ("gun", "guns", "pistol", "rifle"),
            ("knife", "knives"),
            ("money", "cash"),
        ),
    },
    "action": {
        "motion": (
            ("walk", "walks", "walking", "walked"),
            ("run", "runs", "running", "ran"),
            ("stand", "stands", "standing"),
            ("sit", "sits", "sitting"),
            ("fall", "falls", "falling", "fell"),
            ("enter", "enters", "entering"),
        ),
        "violence": (
            ("fight", "fights", "fighting", "fought"),
            ("hit", "hits", "hitting", "strike", "strikes", "beat", "beats", "attack", "attacks"),
            ("punch", "punches", "punching"),
            ("kick", "kicks", "kicking"),
            ("shoot", "shoots", "shooting"),
        ),
        "hands": (
            ("push", "pushes", "pushing"),
            ("pull", "pulls", "pulling"),
            ("grab", "grabs", "grabbing"),
            ("steal", "steals", "stealing", "stole"),
            ("break", "breaks", "breaking", "broke"),
            ("throw", "throws", "throwing", "threw"),
            ("carry", "carries", "carrying"),
        ),
        "fire": (
            ("burn", "burns", "burning", "burned"),
            ("spread", "spreads", "spreading"),
            ("rise", "rises", "rising", "rose"),
            ("explode", "explodes", "exploding", "exploded", "blasts"),
            ("flash", "flashes", "flashing"),
            ("start", "starts", "starting", "started", "set", "sets", "setting"),
        ),
        "vehicle": (
            ("drive", "drives", "driving", "drove"),
            ("crash", "crashes", "crashing", "crashed", "collide", "collides", "colliding"),
        ),
    },
}
# A sense -> the senses it covers: "a person walks" is true of the box of "a man walks".
COVERS: dict[str, frozenset[str]] = {
    "person": frozenset({"man", "woman", "child", "boy", "girl"}),
    "child": frozenset({"boy", "girl"}),
    "vehicle": frozenset({"car", "truck", "bus", "van", "motorcycle", "bicycle"}),
    "street": frozenset({"road", "sidewalk"}),
    "building": frozenset({"shop", "house"}),
    "fight": frozenset({"hit", "punch", "kick", "push"}),
    "hit": frozenset({"punch", "kick"}),
}
# Chinese words, matched as substrings (no spaces to split on), longest first. A Chinese
# caption draws from the Chinese words of the vocabulary only.
CJK_LEXICON: dict[str, dict[str, tuple[tuple[str, ...], ...]]] = {
    "colour": {
        "colour": (
            ("红色", "红"),
            ("绿色", "绿"),
            ("蓝色", "蓝"),
            ("黄色", "黄"),
            ("白色", "白"),
            ("黑色", "黑"),
            ("紫色", "紫"),
            ("橙色", "橙"),
            ("灰色", "灰"),
            ("棕色", "棕"),
            ("粉色", "粉"),
        )
    },
    "number": {
        "number": (
            ("一",),
            ("两", "二"),
            ("三",),
            ("四",),
            ("五",),
            ("六",),
            ("七",),
            ("八",),
            ("九",),
            ("十",),
        )
    },
}

Key = tuple[str, bool]  # (class, is CJK): the vocabulary a word is drawn from
Sense = tuple[str, str]  # (class, sense name); numbers by value, so "2" and "two" are one sense


@dataclass(frozen=True)
class _Word:
    """What a lexicon word is: its vocabulary, sense, kind and grammatical form."""

    key: Key
    sense: Sense
    kind: str
    form: str


# English forms, so that a swap can keep the caption grammatical: plural nouns, and the
# verb's -s, -ing and past forms ("hit", "set": base, as they read more often).
_PLURALS = {"people", "men", "women", "children", "ladies"}
_PAST = {"ran", "fell", "fought", "stole", "broke", "threw", "rose", "drove"}


def _form(cls: str, word: str) -> str:
    if cls == "object":
        return (
            "plural"
            if word in _PLURALS or (word.endswith("s") and not word.endswith(("ss", "bus")))
            else "one"
        )
    if cls == "action":
        if word.endswith("ing"):
            return "ing"
        if word.endswith("ed") or word in _PAST:
            return "past"
        return "s" if word.endswith("s") else "base"
    return ""


def _index(lexicon: dict[str, dict[str, tuple[tuple[str, ...], ...]]], cjk: bool) -> dict[str, _Word]:
    out = {}
    for cls, kinds in lexicon.items():
        for kind, senses in kinds.items():
            for place, words in enumerate(senses, 1):
                name = str(place) if cls == "number" else words[0]
                for word in words:
                    out[word] = _Word((cls, cjk), (cls, name), kind, "" if cjk else _form(cls, word))
    return out


_WORDS = _index(LEXICON, cjk=False)
_CJK_WORDS = _index(CJK_LEXICON, cjk=True)
# ASCII words and digit runs, whole: not inside "x264" nor glued to other letters or digits.
_ASCII_WORD = re.compile(r"(?<![A-Za-z0-9])(?:[A-Za-z]+|[0-9]+)(?![A-Za-z0-9])")
_CJK_WORD = re.compile("|".join(sorted(_CJK_WORDS, key=len, reverse=True)))
_ARTICLE = re.compile(r"(?<![A-Za-z])(an?)(\s+)$", re.IGNORECASE)  # "a"/"an" right before a word
# Tries per word position at most: a class with a huge vocabulary (numbers in ids) is
# sampled from, not shuffled whole.
_MAX_TRIES = 512


def _lookup(key: Key, word: str) -> _Word:
    if word.isdigit():  # by value ("07" is "7"), kept as text: int() refuses over 4,300 digits
        return _Word(key, ("number", word.lstrip("0") or "0"), "number", "")
    return (_CJK_WORDS if key[1] else _WORDS)[word]


def normalise(text: str) -> str:
    """What makes two captions the same caption: NFKC, case, punctuation and whitespace folded.

    Punctuation goes because the tokenizers split it off: "a person in red walks." is
    the caption "a person in red walks" to the model, a true caption, never a negative.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION.sub(" ", folded).split())


_PUNCTUATION = re.compile(r"[^\w\s]")


@dataclass(frozen=True)
class _Slot:
    """One swappable word of a caption: ``caption[start:end]``."""

    start: int
    end: int
    word: _Word


@lru_cache(maxsize=65_536)
def _slots(caption: str) -> tuple[_Slot, ...]:
    """The caption's attribute words, in text order (captions repeat: parsed once each)."""
    slots = []
    for m in _ASCII_WORD.finditer(caption):
        word = m.group().lower()
        if word.isdigit() or word in _WORDS:
            key = ("number", False) if word.isdigit() else _WORDS[word].key
            slots.append(_Slot(m.start(), m.end(), _lookup(key, word)))
    for m in _CJK_WORD.finditer(caption):
        slots.append(_Slot(m.start(), m.end(), _CJK_WORDS[m.group()]))
    return tuple(sorted(slots, key=lambda s: s.start))


def _words(caption: str) -> set[tuple[Key, str]]:
    return {(s.word.key, caption[s.start : s.end].lower()) for s in _slots(caption)}


def _conflict(a: Sense, b: Sense) -> bool:
    """Whether a word of sense ``b`` could make a caption with ``a`` no less true."""
    return a == b or (a[0] == b[0] and (b[1] in COVERS.get(a[1], ()) or a[1] in COVERS.get(b[1], ())))


def _cased(word: str, like: str) -> str:
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _swap(caption: str, slot: _Slot, word: str) -> str:
    """``caption`` with the slot's word replaced, and an "a"/"an" before it following the new word."""
    head = caption[: slot.start]
    english = not slot.word.key[1] and not word.isdigit()  # "a 8" or "an 8": leave the article be
    article = _ARTICLE.search(head) if english else None
    if article:
        a = "an" if word[:1] in "aeiou" else "a"
        head = head[: article.start()] + _cased(a, article.group(1)) + article.group(2)
    return head + _cased(word, caption[slot.start : slot.end]) + caption[slot.end :]


class Vocabulary:
    """Per class (and script), every attribute word the dataset's captions use, sorted."""

    def __init__(self, captions: Iterable[str]):
        seen: dict[Key, set[str]] = {}
        for caption in captions:
            for key, word in _words(caption):
                seen.setdefault(key, set()).add(word)
        self.words: dict[Key, tuple[str, ...]] = {k: tuple(sorted(v)) for k, v in seen.items()}
        self.info: dict[Key, tuple[_Word, ...]] = {
            k: tuple(_lookup(k, w) for w in words) for k, words in self.words.items()
        }
        self._ranks: dict[tuple[Key, str, str], np.ndarray] = {}

    @classmethod
    def from_records(cls, records: list[AnnotationRecord]) -> Vocabulary:
        return cls(c for r in records for c in (r.global_caption, *r.region_captions))

    def _rank(self, word: _Word) -> np.ndarray:
        """Per vocabulary word, its tier for a slot holding ``word``: 0 same form and kind,
        1 same form, 2 same kind, 3 neither. Made once per (form, kind) seen."""
        at = (word.key, word.form, word.kind)
        if at not in self._ranks:
            info = self.info[word.key]
            self._ranks[at] = np.array(
                [2 * (i.form != word.form) + (i.kind != word.kind) for i in info], np.int8
            )
        return self._ranks[at]

    def order(self, slot: _Slot, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """The words that may replace the slot's, in the order to try, seeded, same kind first:
        those of the slot's grammatical form (a plural for a plural), then the others."""
        n = len(self.words.get(slot.word.key, ()))
        if n == 0:
            return [], []
        if n <= _MAX_TRIES:
            order = rng.permutation(n)
        else:  # draws, repeats dropped: choice(replace=False) would shuffle all n each time
            draw = rng.integers(0, n, _MAX_TRIES)
            order = draw[np.sort(np.unique(draw, return_index=True)[1])]
        tier = self._rank(slot.word)[order]
        ranked = order[np.argsort(tier, kind="stable")].tolist()
        cut = int(np.count_nonzero(tier < 2))
        return ranked[:cut], ranked[cut:]


def _seed(video: str, region: int, caption: str) -> int:
    text = f"{video}\x00{region}\x00{caption}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def generate(
    caption: str,
    vocab: Vocabulary,
    k: int,
    *,
    truths: Collection[str],
    seed: int,
    banned: Collection[tuple[Key, str]] = frozenset(),
) -> list[str]:
    """Up to ``k`` negatives of ``caption``, each with one attribute word swapped.

    ``truths``: the normalised true captions of the video, never produced (the positive is
    one). ``banned``: ``(vocabulary key, word)`` pairs never swapped in. Deterministic in
    ``seed``: the word positions take turns in a seeded order, each trying the words of its
    class in a seeded order (``Vocabulary.order``).
    """
    slots = _slots(caption)
    if k <= 0 or not slots:
        return []
    rng = np.random.Generator(np.random.PCG64(seed))
    orders = [vocab.order(slot, rng) for slot in slots]
    turns = rng.permutation(len(slots)).tolist()
    out: list[str] = []
    seen = set(truths)
    # Grammatical swaps first, at every position, then the others: an ungrammatical negative
    # is an easy one (the text alone gives it away), better than none but not before.
    for tier in (0, 1):
        tries = [iter(order[tier]) for order in orders]
        live = list(turns)  # positions that may still give a negative
        while live and len(out) < k:
            for s in list(live):
                if not _next_swap(caption, slots[s], vocab, tries[s], seen, banned, out):
                    live.remove(s)
                if len(out) == k:
                    break
    return out


def _next_swap(
    caption: str,
    slot: _Slot,
    vocab: Vocabulary,
    tries: Iterator[int],
    seen: set[str],
    banned: Collection[tuple[Key, str]],
    out: list[str],
) -> bool:
    """Append the slot's next valid negative to ``out``; False when its words are used up."""
    words, info = vocab.words.get(slot.word.key, ()), vocab.info.get(slot.word.key, ())
    for j in tries:
        if _conflict(slot.word.sense, info[j].sense) or (slot.word.key, words[j]) in banned:
            continue
        text = _swap(caption, slot, words[j])
        norm = normalise(text)
        if norm not in seen:
            seen.add(norm)
            out.append(text)
            return True
    return False


@dataclass
class RegionNegatives:
    """The negatives of every region of the records, in record then region order."""

    per_region: int
    lists: pa.ListArray  # one list of negative captions per region (raw_boxes' region order)
    source: np.ndarray  # int8 per region: NONE, GIVEN or GENERATED
    keys: np.ndarray  # int64 per region: region_key(record position, region)
    rejects: pa.Table  # REJECTS_SCHEMA: one row per dropped given negative (or malformed entry)
    dropped: dict[str, int]  # per NEGATIVE_REASONS, counted from the reject rows
    given: int  # given negative strings in well-formed entries, as read

    def counts(self, keep: np.ndarray | None = None) -> dict:
        """Metrics over the regions where ``keep`` (all when None): how many have which negatives."""
        keep = np.ones(len(self.source), bool) if keep is None else keep
        lengths = np.diff(self.lists.offsets.to_numpy())[keep]
        source = self.source[keep]
        return {
            "per_region": self.per_region,
            "regions": int(keep.sum()),
            "given": int((source == GIVEN).sum()),
            "generated": int((source == GENERATED).sum()),
            "short": int(((lengths > 0) & (lengths < self.per_region)).sum()),
            "none": int((lengths == 0).sum()),
            "dropped": dict(self.dropped),
        }


def empty_lists(n: int) -> pa.ListArray:
    """``n`` empty lists of negatives."""
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))


def region_key(record: np.ndarray, region: np.ndarray) -> np.ndarray:
    """One int64 per (record position in the file, region index)."""
    return np.asarray(record, np.int64) * (1 << 32) + np.asarray(region, np.int64)


def _truths(record: AnnotationRecord) -> dict[str, str]:
    """The record's true captions, normalised -> which caption it is (for a reject's detail)."""
    out = {normalise(record.global_caption): "the global caption"}
    for r, caption in enumerate(record.region_captions):
        out.setdefault(normalise(caption), f"region {r}'s caption")
    return out


def check_given(
    negatives: tuple[str, ...], truths: dict[str, str]
) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The valid given negatives in their order, and ``(text, reason, detail)`` per dropped one."""
    kept, drops, seen = [], [], {}
    for k, text in enumerate(negatives):
        norm = normalise(text)
        if not norm:
            drops.append((text, "negative_blank", f"negative {k} is blank"))
        elif norm in truths:
            drops.append((text, "negative_true_caption", f"negative {k} is {truths[norm]} of the video"))
        elif norm in seen:
            drops.append((text, "negative_duplicate", f"negative {k} repeats negative {seen[norm]}"))
        else:
            seen[norm] = k
            kept.append(text)
    return kept, drops


def _rejects_table(rows: list[tuple]) -> pa.Table:
    """``(record, video, region, raw, reason, detail)`` rows as REJECTS_SCHEMA: no frame, no box."""
    n = len(rows)
    record, video, region, raw, reason, detail = (list(c) for c in zip(*rows)) if rows else ([],) * 6
    return pa.table(
        {
            "record": pa.array(record, pa.int64()),
            "video": pa.array(video, pa.string()),
            "region": pa.array(region, pa.int32()),
            "frame": pa.nulls(n, pa.int64()),
            **{c: pa.nulls(n, pa.float64()) for c in BOX_COORDS},
            "virtual": pa.nulls(n, pa.bool_()),
            "raw": pa.array(raw, pa.string()),
            "reason": pa.array(reason, pa.string()),
            "detail": pa.array(detail, pa.string()),
        },
        schema=REJECTS_SCHEMA,
    )


def region_negatives(
    records: list[AnnotationRecord], malformed: list[Malformed], per_region: int
) -> RegionNegatives:
    """Every region's negatives: its valid given ones, else up to ``per_region`` generated.

    ``malformed`` is ``load_annotations``' list: its ``region_negatives`` parts become
    ``negatives_malformed`` rejects (the other parts are box validation's).
    """
    vocab = Vocabulary.from_records(records) if per_region > 0 else None
    rows = [
        (m.index, m.video, m.region, m.raw, "negatives_malformed", m.detail)
        for m in malformed
        if m.key == NEGATIVES_KEY
    ]
    values: list[str] = []
    offsets, source, record_pos, region_idx = [0], [], [], []
    given = 0
    for record in records:
        truths = _truths(record)
        captions = (record.global_caption, *record.region_captions)
        banned = frozenset(w for c in captions for w in _words(c)) if not record.box_infos else frozenset()
        for r, caption in enumerate(record.region_captions):
            mine = record.region_negatives[r] if record.region_negatives else ()
            given += len(mine)
            kept, drops = check_given(mine, truths)
            rows.extend(
                (record.index, record.video, r, json.dumps(text, ensure_ascii=False), reason, detail)
                for text, reason, detail in drops
            )
            src = GIVEN if kept else NONE
            if not kept and vocab is not None:
                seed = _seed(record.video, r, caption)
                kept = generate(caption, vocab, per_region, truths=truths, seed=seed, banned=banned)
                src = GENERATED if kept else NONE
            values.extend(kept)
            offsets.append(len(values))
            source.append(src)
            record_pos.append(record.index)
            region_idx.append(r)
    rejects = _rejects_table(rows)
    reasons = Counter(rejects["reason"].to_pylist())
    return RegionNegatives(
        per_region=per_region,
        lists=pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.string())),
        source=np.array(source, np.int8),
        keys=region_key(np.array(record_pos, np.int64), np.array(region_idx, np.int64)),
        rejects=rejects,
        dropped={reason: reasons[reason] for reason in NEGATIVE_REASONS},
        given=given,
    )
