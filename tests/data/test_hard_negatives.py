"""Hard-negative captions: generation from the dataset's words, validation of given ones, the
lists in the box shards, their rejects, metrics and accounting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import fgclip.data.hard_negatives as hn
from fgclip.config import Params
from fgclip.data.annotations import AnnotationRecord, Keyframe, load_annotations
from fgclip.data.boxes import REASONS, BoxAccountingError, validate_boxes
from fgclip.data.hard_negatives import (
    GENERATED,
    GIVEN,
    NEGATIVE_REASONS,
    NONE,
    Vocabulary,
    check_given,
    generate,
    normalise,
    region_negatives,
)
from fgclip.data.layout import read_box_shards, read_rejects
from fgclip.data.sample import GLOBAL_CAPTIONS, PALETTE, REGION_CAPTIONS

REPO = Path(__file__).resolve().parents[2]
# Prints the negatives of data.json, in a process of its own.
CHILD = (
    "import json; from fgclip.data.hard_negatives import region_negatives;"
    "from fgclip.data.annotations import load_annotations;"
    "print(json.dumps(region_negatives(*load_annotations('data.json'), 10).lists.to_pylist()))"
)
VIDEO = "Arson/Arson001_x264.mp4"


def _sample_captions() -> list[str]:
    """Every caption the embedded sample can write: each template under every colour pair."""
    fills = [{"a": a, "b": b} for a in PALETTE for b in PALETTE if a != b]
    templates = [t for d in (GLOBAL_CAPTIONS, REGION_CAPTIONS) for ts in d.values() for t in ts]
    return sorted({t.format(**f) for t in templates for f in fills})


def _record(
    index: int, captions: list[str], *, boxes: bool = True, negatives=None, **fields
) -> AnnotationRecord:
    return AnnotationRecord(
        index=index,
        video=fields.get("video", f"Arson{index:03d}.mp4"),
        global_caption=fields.get("global_caption", "a fire spreads and burns"),
        region_captions=tuple(captions),
        box_infos=tuple((Keyframe(1, (0.1, 0.1, 0.5, 0.5)),) for _ in captions) if boxes else (),
        timestamps=None,
        region_negatives=negatives,
    )


def _swapped_spans(caption: str, negative: str) -> tuple[str, str]:
    """The one differing stretch of two captions (common prefix and suffix removed)."""
    p = 0
    while p < min(len(caption), len(negative)) and caption[p] == negative[p]:
        p += 1
    s = 0
    while s < min(len(caption), len(negative)) - p and caption[-1 - s] == negative[-1 - s]:
        s += 1
    return caption[p : len(caption) - s], negative[p : len(negative) - s]


def _one_word_swapped(caption: str, negative: str) -> bool:
    """The words of the two differ in one place, or in one place and the "a"/"an" before it."""
    old, new = caption.split(" "), negative.split(" ")
    diff = [k for k, (a, b) in enumerate(zip(old, new)) if a != b]
    if len(old) != len(new) or not diff:
        return False
    article = len(diff) == 2 and diff[1] == diff[0] + 1 and {old[diff[0]], new[diff[0]]} == {"a", "an"}
    return len(diff) == 1 or article


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", sorted(REGION_CAPTIONS))
def test_every_sample_template_gets_negatives(name: str):
    """Each region template of the sample, filled as the sample fills it, gets >= 5 negatives
    from the sample's own vocabulary; each is one word swap and never a true caption."""
    vocab = Vocabulary(_sample_captions())
    for template in REGION_CAPTIONS[name]:
        caption = template.format(a="red", b="blue")
        truths = {normalise(caption), normalise("a fire spreads and burns")}
        negatives = generate(caption, vocab, 10, truths=truths, seed=7)
        assert 5 <= len(negatives) <= 10, (caption, negatives)
        assert len({normalise(n) for n in negatives}) == len(negatives)  # no repeats
        assert not {normalise(n) for n in negatives} & truths
        assert all(_one_word_swapped(caption, n) for n in negatives), (caption, negatives)


def test_same_negatives_in_another_process(tmp_path: Path):
    """Same file, same negatives: here and in a process with another string-hash seed."""
    captions = _sample_captions()
    entries = [  # normal videos (whole-frame regions) and videos with boxes, every sample caption
        {
            "video": f"Video{k:03d}.mp4",
            "global_caption": "people walk along the street",
            "region_captions": captions[k * 3 : k * 3 + 3],
            "box_infos": [] if k % 2 else [[{"frame": 1, "bbox": [0.1, 0.1, 0.5, 0.5]}]] * 3,
            "timestamps": [0, 3],
        }
        for k in range(len(captions) // 3)
    ]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    here = region_negatives(*load_annotations(tmp_path / "data.json"), 10).lists.to_pylist()
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == here
    assert all(1 <= len(n) <= 10 for n in here) and max(len(n) for n in here) == 10


def test_never_a_true_caption_of_the_video():
    """A normal video's whole frame carries every walker's caption: none of them, nor a caption
    naming another walker's colour, is a negative of any of its regions."""
    captions = ["a person in red walks", "a person in blue walks", "a man in green walks along the street"]
    record = _record(0, captions, boxes=False, global_caption="people walk along the street")
    other = _record(1, ["a person in yellow walks", "a person in white walks on the sidewalk"])
    negatives = region_negatives([record, other], [], 10)
    truths = {normalise(c) for c in [*captions, record.global_caption]}
    for r in range(3):
        mine = negatives.lists[r].as_py()
        assert mine and not {normalise(n) for n in mine} & truths
        for n in mine:  # the frame shows red, blue and green walkers: no swap to those colours
            assert not any(f"in {c}" in n for c in ("red", "blue", "green") if f"in {c}" not in captions[r])
    # a record with boxes may swap in its other region's colour: another box, a hard negative
    assert any("white" in n for n in negatives.lists[3].as_py())


def test_at_most_n_and_round_robin_over_words():
    vocab = Vocabulary(_sample_captions())
    caption = "a man in red walks along the street"
    for n in (1, 3, 10):
        assert len(generate(caption, vocab, n, truths={normalise(caption)}, seed=1)) == n
    negatives = generate(caption, vocab, 8, truths={normalise(caption)}, seed=1)
    swapped = {_swapped_spans(caption, n)[0] for n in negatives}
    assert len(swapped) >= 4  # man, red, walks, street all take turns: not eight colour swaps
    assert generate(caption, vocab, 0, truths=set(), seed=1) == []


def test_synonyms_and_covered_words_are_never_swapped_in():
    vocab = Vocabulary(["flames burn", "a fire spreads", "a blaze", "people walk", "a man runs", "smoke"])
    assert not any(
        "fire" in n or "blaze" in n for n in generate("flames burn", vocab, 10, truths=set(), seed=3)
    )
    # "a person" would still be true of the man's box
    assert not any(
        "person" in n or "people" in n for n in generate("a man runs", vocab, 10, truths=set(), seed=3)
    )


def test_case_punctuation_and_article_follow_the_caption():
    vocab = Vocabulary(["an orange car", "a red car", "a blue truck"])
    negatives = generate("A RED car, near the Tower!", vocab, 10, truths=set(), seed=5)
    assert sorted(negatives) == [
        "A BLUE car, near the Tower!",
        "A RED truck, near the Tower!",
        "An ORANGE car, near the Tower!",
    ]
    assert "A RED car, near the Truck!" in generate(
        "A RED car, near the Car!", vocab, 10, truths=set(), seed=5
    )


def test_grammatical_swaps_come_first():
    vocab = Vocabulary(["cars burn", "people walk", "a man walks", "smoke rises", "a car"])
    negatives = generate("flames burn", vocab, 10, truths=set(), seed=2)
    grammatical = {"cars burn", "people burn", "flames walk"}
    assert set(negatives[:3]) == grammatical  # plurals for "flames", base verbs for "burn"
    assert len(negatives) > 3  # then the rest ("flames walks", "man burn", ...) fill in


def test_chinese_captions_swap_chinese_words():
    vocab = Vocabulary(["一个穿红色衣服的男子在街上走", "两个穿蓝色衣服的人", "黑色汽车", "a red car"])
    caption = "一个穿红色衣服的男子在街上走"
    negatives = generate(caption, vocab, 10, truths={normalise(caption)}, seed=4)
    assert "一个穿蓝色衣服的男子在街上走" in negatives and "两个穿红色衣服的男子在街上走" in negatives
    assert all(n.isascii() is False and "red" not in n for n in negatives)


def test_a_caption_without_attribute_words_gets_none_and_is_counted():
    records = [
        _record(0, ["something happens here", "flames burn"], global_caption="flames burn on the street")
    ]
    negatives = region_negatives(records, [], 10)
    assert negatives.lists[0].as_py() == []
    assert negatives.source.tolist() == [NONE, GENERATED]
    counts = negatives.counts()
    assert (counts["regions"], counts["generated"], counts["none"], counts["given"]) == (2, 1, 1, 0)
    # only the vocabulary's own words: "flames burn on the street" lends "street"
    assert negatives.lists[1].as_py() == ["street burn"]
    assert counts["short"] == 1


def test_many_regions_are_fast_enough():
    """UCF-Crime's 1,559 records x 4 regions: a second or so of plain Python."""
    captions = _sample_captions()
    records = [
        _record(k, [captions[(k * 4 + r) % len(captions)] for r in range(4)], video=f"v{k}.mp4")
        for k in range(1559)
    ]
    negatives = region_negatives(records, [], 10)
    assert len(negatives.lists) == 1559 * 4
    assert (negatives.source == GENERATED).all()


# --------------------------------------------------------------------------- given negatives


def test_given_negatives_are_validated():
    record = _record(
        0,
        ["a man in red hits another man", "a man in blue fights back"],
        global_caption="two people fight each other",
        negatives=(
            (
                "a man in green hits another man",
                "  ",
                "A man in red hits   another man",  # the positive, in other case and spacing
                "two people fight each other",  # the global caption
                "a man in blue fights back",  # another region's caption
                "a man in GREEN hits another man",  # a repeat
                *[f"a man in red hits {k} men" for k in range(12)],  # more than per_region: all kept
            ),
            (),
        ),
    )
    kept, drops = check_given(record.region_negatives[0], hn._truths(record))
    assert kept == ["a man in green hits another man", *[f"a man in red hits {k} men" for k in range(12)]]
    assert [(d[0], d[1]) for d in drops] == [
        ("  ", "negative_blank"),
        ("A man in red hits   another man", "negative_true_caption"),
        ("two people fight each other", "negative_true_caption"),
        ("a man in blue fights back", "negative_true_caption"),
        ("a man in GREEN hits another man", "negative_duplicate"),
    ]
    assert "region 0's caption" in drops[1][2] and "global caption" in drops[2][2]
    assert "region 1's caption" in drops[3][2] and "repeats negative 0" in drops[4][2]

    negatives = region_negatives([record], [], 10)
    assert negatives.lists[0].as_py() == kept and negatives.source.tolist() == [GIVEN, GENERATED]
    assert negatives.given == 18
    assert negatives.dropped == {
        "negatives_malformed": 0,
        "negative_blank": 1,
        "negative_true_caption": 3,
        "negative_duplicate": 1,
    }
    rows = negatives.rejects.to_pylist()
    assert [json.loads(r["raw"]) for r in rows] == [d[0] for d in drops]
    assert all(r["record"] == 0 and r["region"] == 0 and r["frame"] is None and r["x1"] is None for r in rows)


def test_all_invalid_given_falls_back_to_generated():
    record = _record(0, ["flames burn"], negatives=(("flames burn", ""),))
    negatives = region_negatives([record, _record(1, ["people walk", "smoke rises"])], [], 10)
    assert negatives.source.tolist()[0] == GENERATED and negatives.lists[0].as_py()


def test_no_generation_when_per_region_is_zero():
    records = [_record(0, ["flames burn", "smoke rises"], negatives=(("smoke burn",), ()))]
    negatives = region_negatives(records, [], 0)
    assert negatives.lists.to_pylist() == [["smoke burn"], []]
    assert negatives.counts()["none"] == 1 and negatives.counts()["short"] == 0


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def keyframe(tiny_frames: Path) -> int:
    index = pq.read_table(tiny_frames / "index.parquet")
    return min(index.filter(pc.equal(index["video"], VIDEO))["frame"].to_pylist())


def _entry(frame: int, **fields) -> dict:
    return {
        "video": "Arson001.mp4",
        "global_caption": "a fire spreads and burns",
        "region_captions": ["flames burn", "a person in red starts a fire", "dark smoke rises"],
        "box_infos": [[{"frame": frame, "bbox": [0.1, 0.2, 0.5, 0.6]}]] * 3,
        "timestamps": None,
        **fields,
    }


def _stage(params: Params, entries: list, frames: Path, tmp_path: Path) -> tuple[dict, Path]:
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(entries))
    out = tmp_path / "boxes"
    return validate_boxes(params, ann, frames, out, tmp_path / "boxes.json"), out


def test_stage_writes_lists_rejects_and_counts(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, keyframe: int, tmp_path: Path
):
    sample = json.loads((tiny_sample / "annotations.json").read_text())
    sample = [e for e in sample if e["video"] != VIDEO]
    given = [["smoke burn", "flames burn", " ", "smoke burn", "fire walks"], None, "a bad entry"]
    metrics, out = _stage(
        tiny_params, [_entry(keyframe, region_negatives=given), *sample], tiny_frames, tmp_path
    )

    # box accounting is about boxes only: the negatives' rejects are not box rows
    assert metrics["accepted"] + metrics["rejected"] == metrics["read"]
    assert metrics["by_reason"]["malformed"] == 0 and set(metrics["by_reason"]) == set(REASONS)
    assert metrics["records"] == len(sample) + 1

    shards = read_box_shards(out, ["video", "region", "region_negatives"])
    lists: dict = {}
    for row in shards.to_pylist():  # one list per region, on every one of its rows
        assert (
            lists.setdefault((row["video"], row["region"]), row["region_negatives"])
            == row["region_negatives"]
        )
    assert lists[(VIDEO, 0)] == ["smoke burn", "fire walks"]  # given, validated, in order
    assert len(lists[(VIDEO, 1)]) == 10 and len(lists[(VIDEO, 2)]) == 10  # null, malformed: generated
    assert "a person in red starts a fire" not in lists[(VIDEO, 1)]

    rejects = read_rejects(out).filter(
        pc.is_in(read_rejects(out)["reason"], pc.cast(NEGATIVE_REASONS, "string"))
    )
    rows = rejects.to_pylist()
    assert [(r["reason"], r["region"], json.loads(r["raw"])) for r in rows] == [
        ("negatives_malformed", 2, "a bad entry"),
        ("negative_true_caption", 0, "flames burn"),
        ("negative_blank", 0, " "),
        ("negative_duplicate", 0, "smoke burn"),
    ]
    assert all(r["video"] == "Arson001.mp4" and r["record"] == 0 and r["frame"] is None for r in rows)
    assert rejects.num_rows + metrics["rejected"] == read_rejects(out).num_rows

    negatives = metrics["negatives"]
    assert negatives == json.loads((tmp_path / "boxes.json").read_text())["negatives"]
    regions = len(lists)
    short = sum(0 < len(v) < 10 for v in lists.values())
    assert negatives == {
        "per_region": 10,
        "regions": regions,
        "given": 1,
        "generated": regions - 1 - sum(not v for v in lists.values()),
        "short": short,
        "none": sum(not v for v in lists.values()),
        "dropped": {
            "negatives_malformed": 1,
            "negative_blank": 1,
            "negative_true_caption": 1,
            "negative_duplicate": 1,
        },
    }
    assert short >= 1  # "smoke burn", "fire walks": fewer than per_region, counted


def test_only_regions_in_the_shards_are_counted(
    tiny_params: Params, tiny_frames: Path, keyframe: int, tmp_path: Path
):
    entries = [_entry(keyframe), _entry(keyframe, video="Nope001.mp4")]  # the second: unknown video
    metrics, _ = _stage(tiny_params, entries, tiny_frames, tmp_path)
    assert metrics["negatives"]["regions"] == 3 and metrics["by_reason"]["unknown_video"] == 3


def test_sample_shards_carry_negatives(tiny_params: Params, tiny_boxes: Path):
    table = read_box_shards(
        tiny_boxes, ["video", "region", "region_caption", "global_caption", "region_negatives"]
    )
    by_region: dict = {}
    for row in table.to_pylist():
        by_region.setdefault((row["video"], row["region"]), []).append(row)
    captions = {}
    for (video, _), rows in by_region.items():
        captions.setdefault(video, {rows[0]["global_caption"]}).update(r["region_caption"] for r in rows)
    for (video, _), rows in by_region.items():
        lists = {tuple(r["region_negatives"]) for r in rows}
        assert len(lists) == 1  # the same list on every row of the region
        (negatives,) = lists
        assert 1 <= len(negatives) <= 10 and len(set(negatives)) == len(negatives)
        assert not {normalise(n) for n in negatives} & {normalise(c) for c in captions[video]}
    metrics = json.loads(tiny_params.paths.boxes_metrics.read_text())["negatives"]
    assert metrics["regions"] == len(by_region) and metrics["none"] == 0
    assert metrics["generated"] == len(by_region) and metrics["given"] == 0


def test_negatives_accounting_error_when_a_reject_is_lost(
    tiny_params: Params, tiny_frames: Path, keyframe: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real = hn._rejects_table
    monkeypatch.setattr(hn, "_rejects_table", lambda rows: real(rows).slice(1))  # a bug that loses a row
    entries = [_entry(keyframe, region_negatives=[["", "smoke burn"], [], []])]
    with pytest.raises(BoxAccountingError, match=r"read 2 given negatives but kept 1 \+ dropped 0"):
        _stage(tiny_params, entries, tiny_frames, tmp_path)
    assert not (tmp_path / "boxes").exists() and not (tmp_path / "boxes.json").exists()


def test_region_key_orders_records_then_regions():
    keys = hn.region_key(np.array([0, 0, 1, 2**31]), np.array([0, 5, 0, 3]))
    assert (np.diff(keys) > 0).all()
