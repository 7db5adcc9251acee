"""The embedded synthetic UCF-Crime-style sample: real H.264 videos, split files, annotations.

Everything is deterministic from ``sample.seed``. Each video is a textured grey
street (different per video) with people walking; an anomalous video shows its
event (fire, blast, fight, car crash) inside its annotated interval(s) and looks
normal outside them. The content is simple enough for a tiny CLIP at 64x64 pixels
to learn from pixels, and every caption reuses the vocabulary of the evaluation
prompts in ``params.yaml`` with the objects' real colours.

Boxes in ``annotations.json`` are the true extents of the drawn objects, recorded
while the very frame is rendered. With ``bad_boxes`` a few deliberately bad boxes
are planted on training videos as extra keyframes (so the video keeps its good
ones); their kinds are named by the reason code ``validate_boxes`` gives them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import av
import numpy as np

from fgclip.atomic import atomic_path, write_text_atomic
from fgclip.config import DataConfig, SampleConfig
from fgclip.data.ucf import NORMAL_LABEL, format_temporal_line, video_id

logger = logging.getLogger(__name__)

# Written into the sample root; its presence marks a directory this module may overwrite.
MARKER = "sample.json"

Color = tuple[int, int, int]
Box = tuple[float, float, float, float]  # pixels, x1 y1 x2 y2

PALETTE: dict[str, Color] = {
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (45, 75, 225),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "purple": (150, 55, 190),
}
# A person's size as a fraction of the frame: at the tiny model's 64 px input the
# shirt (the colour a region caption names) then covers most of one 8 px patch, so
# RoIAlign on the patch grid does not blur it into the street around it.
PERSON_W, PERSON_H = 0.1, 0.36
SKIN: Color = (225, 180, 140)
TROUSERS: Color = (40, 40, 60)

GLOBAL_CAPTIONS: dict[str, list[str]] = {
    "Normal": [
        "people walk along the street",
        "a quiet street with people walking",
        "people walk on the sidewalk",
    ],
    "Normal1": [  # a normal video with a single walker
        "a person walks along the street",
        "a person in {a} walks along the street",
        "a quiet street with a person walking",
    ],
    "Arson": [
        "a fire spreads and burns",
        "flames burn on the street",
        "a person in {a} starts a fire and flames spread",
    ],
    "Explosion": [
        "an explosion flashes and blasts",
        "a bright blast explodes",
        "a bright blast explodes and dark smoke rises",
    ],
    "Fighting": [
        "two people fight each other",
        "people hit each other",
        "a man in {a} and a man in {b} fight each other",
    ],
    "RoadAccidents": [
        "a car crashes into another car",
        "two cars collide on the road",
        "a {a} car crashes into a {b} car",
    ],
}
REGION_CAPTIONS: dict[str, list[str]] = {
    "walker": [
        "a person in {a} walks",
        "a man in {a} walks along the street",
        "a person in {a} walks on the sidewalk",
    ],
    "fire": ["flames burn", "a fire spreads", "orange flames burn on the street"],
    "arsonist": ["a person in {a} starts a fire", "a man in {a} sets a fire"],
    "blast": ["a bright blast explodes", "an explosion flashes"],
    "smoke": ["dark smoke rises", "black smoke spreads after the blast"],
    "fighter_a": ["a man in {a} hits another man", "a man in {a} punches a man in {b}"],
    "fighter_b": ["a man in {b} fights back", "a man in {b} is hit by a man in {a}"],
    "fight": ["two people fight each other", "people hit each other"],
    "car_a": ["the {a} car", "a {a} car drives on the road"],
    "car_b": ["the {b} car", "a {b} car drives toward the {a} car"],
    "crash": ["a {a} car crashes into the {b} car", "two cars collide on the road"],
}


def _region_caption(rng: np.random.Generator, name: str, paraphrases: bool) -> str:
    """A region caption template: a random paraphrase, or the concept's first wording.

    Paraphrases drawn at random for identical pixels (one fire region "flames
    burn", another "a fire spreads") are negatives of each other that no image
    can tell apart, so they put a floor under the region loss that says nothing
    about training. The draw is made either way so the rest of the sample is the
    same with and without them.
    """
    options = REGION_CAPTIONS[name]
    drawn = str(rng.choice(options))
    return drawn if paraphrases else options[0]


EVENTS = ("Arson", "Explosion", "Fighting", "RoadAccidents")  # anomaly classes the sample can draw

# Kinds of planted bad boxes, named by the reason code box validation gives them.
BAD_BOX_KINDS = ("out_of_range", "too_small", "non_finite", "inverted", "keyframe_out_of_range")


# --------------------------------------------------------------------------- drawing


def _rect(img: np.ndarray, x1: float, y1: float, x2: float, y2: float, color: Color) -> None:
    h, w = img.shape[:2]
    c1, r1 = max(round(x1), 0), max(round(y1), 0)
    c2, r2 = min(round(x2), w), min(round(y2), h)
    if c1 < c2 and r1 < r2:
        img[r1:r2, c1:c2] = color


def _ellipse(img: np.ndarray, cx: float, cy: float, rx: float, ry: float, color: Color) -> None:
    h, w = img.shape[:2]
    c1, c2 = max(int(cx - rx), 0), min(math.ceil(cx + rx), w)
    r1, r2 = max(int(cy - ry), 0), min(math.ceil(cy + ry), h)
    if c1 >= c2 or r1 >= r2 or rx <= 0 or ry <= 0:
        return
    yy, xx = np.ogrid[r1:r2, c1:c2]
    mask = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
    img[r1:r2, c1:c2][mask] = color


def _rotated_rect(
    img: np.ndarray, cx: float, cy: float, w: float, h: float, angle: float, color: Color
) -> Box:
    """Fill a rectangle rotated by ``angle`` radians about its centre; return its bounds."""
    c, s = math.cos(angle), math.sin(angle)
    ex = abs(w / 2 * c) + abs(h / 2 * s)
    ey = abs(w / 2 * s) + abs(h / 2 * c)
    ih, iw = img.shape[:2]
    c1, c2 = max(int(cx - ex), 0), min(math.ceil(cx + ex), iw)
    r1, r2 = max(int(cy - ey), 0), min(math.ceil(cy + ey), ih)
    if c1 < c2 and r1 < r2:
        yy, xx = np.ogrid[r1:r2, c1:c2]
        dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
        mask = (np.abs(dx * c + dy * s) <= w / 2) & (np.abs(-dx * s + dy * c) <= h / 2)
        img[r1:r2, c1:c2][mask] = color
    return cx - ex, cy - ey, cx + ex, cy + ey


def _union(*boxes: Box) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _person(
    img: np.ndarray, x: float, feet: float, w: float, h: float, color: Color, stride: float, punch: int = 0
) -> Box:
    """An upright person (head, shirt, two legs); ``punch`` = -1/+1 extends an arm left/right."""
    swing = 0.1 * w * math.sin(stride)
    _rect(img, x + 0.1 * w + swing, feet - 0.36 * h, x + 0.45 * w + swing, feet, TROUSERS)
    _rect(img, x + 0.55 * w - swing, feet - 0.36 * h, x + 0.9 * w - swing, feet, TROUSERS)
    _rect(img, x, feet - 0.75 * h, x + w, feet - 0.34 * h, color)
    _ellipse(img, x + w / 2, feet - 0.87 * h, 0.36 * w, 0.13 * h, SKIN)
    box = (x, feet - h, x + w, feet)
    if punch:
        arm = (x + w, x + 1.7 * w) if punch > 0 else (x - 0.7 * w, x)
        _rect(img, arm[0], feet - 0.7 * h, arm[1], feet - 0.6 * h, color)
        box = _union(box, (arm[0], feet - 0.7 * h, arm[1], feet - 0.6 * h))
    return box


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A grey street: building fronts, upper sidewalk, road with lane dashes, lower sidewalk."""
    grey = int(rng.integers(85, 140))
    img = np.empty((h, w, 3), np.float32)
    bands = [(0.0, 0.3, grey - 15), (0.3, 0.45, grey + 25), (0.45, 0.8, grey - 30), (0.8, 1.0, grey + 20)]
    for top, bottom, level in bands:
        img[int(top * h) : int(bottom * h)] = level
    for x in range(int(rng.integers(0, w // 8)), w, max(w // 6, 4)):  # building blocks
        img[: int(0.3 * h), x : x + max(w // 8, 2)] += float(rng.integers(-20, 20))
    dash, lane = max(w // 10, 2), int(0.625 * h)
    for x in range(int(rng.integers(0, 2 * dash)), w, 2 * dash):
        img[lane : lane + max(h // 60, 1), x : x + dash] = grey + 60
    img += rng.normal(0.0, 5.0, size=(h, w, 1))  # static texture, a little colour-neutral grain
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- actors


@dataclass
class Walker:
    """A person walking at constant speed, turning back at the frame edges."""

    color: Color
    x0: float
    feet: float
    speed: float  # pixels per frame, signed
    w: float
    h: float

    def draw(self, img: np.ndarray, t: int) -> Box:
        span = img.shape[1] - self.w
        pos = (self.x0 + self.speed * t) % (2 * span)
        x = pos if pos <= span else 2 * span - pos
        return _person(img, x, self.feet, self.w, self.h, self.color, stride=0.5 * abs(self.speed) * t)


class Event(Protocol):
    """An anomaly drawn from progress ``p`` in [0, 1] over its interval; ``draw`` returns named boxes."""

    regions: list[tuple[str, list[float]]]  # (box name, progresses of its keyframes), one per region
    colors: dict[str, str]  # caption placeholders ("a", "b") -> colour names

    def draw(self, img: np.ndarray, p: float, t: int) -> dict[str, Box]: ...


@dataclass
class Arson:
    color: str
    x_from: float
    fire_x: float
    ground: float
    size: float  # full-grown flame height in pixels
    w: float
    h: float
    phases: np.ndarray = field(default_factory=lambda: np.zeros(5))
    regions: ClassVar[list[tuple[str, list[float]]]] = [("fire", [0.6, 0.92]), ("arsonist", [0.15])]

    @property
    def colors(self) -> dict[str, str]:
        return {"a": self.color}

    def draw(self, img: np.ndarray, p: float, t: int) -> dict[str, Box]:
        # The person walks to the spot, stays while the fire catches, then walks away.
        stand = self.fire_x - 1.3 * self.w
        if p < 0.2:
            x = self.x_from + (stand - self.x_from) * p / 0.2
        elif p < 0.35:
            x = stand
        else:
            x = stand - (p - 0.35) * 3.0 * self.w
        boxes = {"arsonist": _person(img, x, self.ground, self.w, self.h, PALETTE[self.color], 3.0 * t)}
        if p >= 0.2:
            grow = min(0.15 + (p - 0.2) / 0.5, 1.0)
            flames = []
            for k, phase in enumerate(self.phases):
                flicker = 0.8 + 0.2 * math.sin(1.9 * t + phase) * math.sin(0.7 * t + 2 * phase)
                ry = 0.5 * self.size * grow * flicker * (0.7 + 0.3 * ((k + 1) % 3))
                rx = 0.22 * self.size * grow
                cx = self.fire_x + (k - 2) * 0.3 * rx
                flames.append((cx, self.ground - ry, rx, ry))
            for scale, color in ((1.0, (225, 70, 20)), (0.7, (255, 150, 30)), (0.4, (255, 235, 100))):
                for cx, cy, rx, ry in flames:
                    _ellipse(img, cx, cy + (1 - scale) * ry, rx * scale, ry * scale, color)
            boxes["fire"] = _union(*((cx - rx, cy - ry, cx + rx, cy + ry) for cx, cy, rx, ry in flames))
        return boxes


@dataclass
class Explosion:
    cx: float
    cy: float
    radius: float
    rise: float
    regions: ClassVar[list[tuple[str, list[float]]]] = [("blast", [0.2, 0.35]), ("smoke", [0.7, 0.95])]
    colors: ClassVar[dict[str, str]] = {}  # nobody to describe: the captions name no colour

    def draw(self, img: np.ndarray, p: float, t: int) -> dict[str, Box]:
        boxes: dict[str, Box] = {}
        if p < 0.12:  # the flash: the whole scene washes out
            alpha = 0.15 + 0.8 * (1 - p / 0.12)
            img[:] = (img * (1 - alpha) + np.array([255, 250, 220]) * alpha).astype(np.uint8)
        if 0.03 <= p < 0.45:
            r = self.radius * ((p - 0.03) / 0.42) ** 0.6 + 1.0
            _ellipse(img, self.cx, self.cy, r, r, (250, 130, 20))
            _ellipse(img, self.cx, self.cy, 0.7 * r, 0.7 * r, (255, 240, 170))
            boxes["blast"] = (self.cx - r, self.cy - r, self.cx + r, self.cy + r)
        if p >= 0.35:
            q = (p - 0.35) / 0.65
            r = self.radius * (0.45 + 0.5 * q)
            up = self.cy - self.rise * q
            blobs = [
                (self.cx + dx * r, up + dy * r, r * s)
                for dx, dy, s in ((-0.5, 0.1, 0.6), (0.5, 0.1, 0.6), (0.0, -0.35, 0.7), (0.0, 0.2, 0.55))
            ]
            for bx, by, br in blobs:
                _ellipse(img, bx, by, br, br * 0.8, (55, 55, 58))
            boxes["smoke"] = _union(
                *((bx - br, by - 0.8 * br, bx + br, by + 0.8 * br) for bx, by, br in blobs)
            )
        return boxes


@dataclass
class _TwoParties:
    """An event between two coloured parties: the captions' placeholders "a" and "b"."""

    color_a: str
    color_b: str

    @property
    def colors(self) -> dict[str, str]:
        return {"a": self.color_a, "b": self.color_b}


@dataclass
class Fighting(_TwoParties):
    x: float
    feet: float
    w: float
    h: float
    regions: ClassVar[list[tuple[str, list[float]]]] = [
        ("fighter_a", [0.3, 0.75]),
        ("fighter_b", [0.5]),
        ("fight", [0.4, 0.85]),
    ]

    def draw(self, img: np.ndarray, p: float, t: int) -> dict[str, Box]:
        # Fast jitter and alternating punches: what tells a fight from two people standing.
        jx = self.w * (0.35 * math.sin(2.1 * t) + 0.2 * math.sin(5.3 * t))
        jy = 0.06 * self.h * abs(math.sin(3.1 * t))
        turn = (t // 3) % 2
        a = _person(
            img,
            self.x - self.w + jx,
            self.feet - jy,
            self.w,
            self.h,
            PALETTE[self.color_a],
            2.5 * t,
            punch=+1 if turn == 0 else 0,
        )
        b = _person(
            img,
            self.x + 0.6 * self.w - jx,
            self.feet + jy - 0.06 * self.h,
            self.w,
            self.h,
            PALETTE[self.color_b],
            2.5 * t + 1.0,
            punch=-1 if turn == 1 else 0,
        )
        return {"fighter_a": a, "fighter_b": b, "fight": _union(a, b)}


@dataclass
class RoadAccident(_TwoParties):
    lane: float
    w: float
    h: float
    frame_w: float
    regions: ClassVar[list[tuple[str, list[float]]]] = [
        ("car_a", [0.2]),
        ("car_b", [0.25]),
        ("crash", [0.55, 0.9]),
    ]

    def _car(self, img: np.ndarray, cx: float, cy: float, angle: float, name: str) -> Box:
        color = PALETTE[name]
        box = _rotated_rect(img, cx, cy, self.w, self.h, angle, color)
        _rotated_rect(img, cx, cy, 0.5 * self.w, 0.6 * self.h, angle, tuple(int(0.55 * c) for c in color))
        return box

    def draw(self, img: np.ndarray, p: float, t: int) -> dict[str, Box]:
        # Head-on along the road, contact at p = 0.4, then stopped and skewed.
        drive = min(p / 0.4, 1.0)
        mid, start_a, start_b = self.frame_w / 2, self.w / 2, self.frame_w - self.w / 2
        xa = start_a + (mid - 0.45 * self.w - start_a) * drive  # the bumpers overlap a little at contact
        xb = start_b + (mid + 0.45 * self.w - start_b) * drive
        skew = 0.0 if p < 0.4 else 0.45 * min((p - 0.4) / 0.1, 1.0)
        a = self._car(img, xa, self.lane - 0.15 * self.h, -skew, self.color_a)
        b = self._car(img, xb, self.lane + 0.15 * self.h, 0.7 * skew, self.color_b)
        return {"car_a": a, "car_b": b, "crash": _union(a, b)}


def _make_event(label: str, rng: np.random.Generator, w: int, h: int, colors: list[str]) -> Event:
    pw, ph = PERSON_W * w, PERSON_H * h
    if label == "Arson":
        return Arson(
            colors[0],
            x_from=float(rng.uniform(0.0, 0.2) * w),
            fire_x=float(rng.uniform(0.45, 0.8) * w),
            ground=float(rng.uniform(0.8, 0.95) * h),
            size=float(rng.uniform(0.35, 0.45) * h),
            w=pw,
            h=ph,
            phases=rng.uniform(0, 2 * math.pi, 5),
        )
    if label == "Explosion":
        return Explosion(
            cx=float(rng.uniform(0.35, 0.65) * w),
            cy=float(rng.uniform(0.5, 0.65) * h),
            radius=float(rng.uniform(0.2, 0.28) * min(w, h) * 1.2),
            rise=0.2 * h,
        )
    if label == "Fighting":
        return Fighting(
            colors[0],
            colors[1],
            x=float(rng.uniform(0.3, 0.7) * w),
            feet=float(rng.uniform(0.85, 0.97) * h),
            w=pw * 1.3,
            h=ph * 1.3,
        )
    if label == "RoadAccidents":
        return RoadAccident(
            colors[0],
            colors[1],
            lane=float(rng.uniform(0.58, 0.68) * h),
            w=0.24 * w,
            h=0.13 * h,
            frame_w=float(w),
        )
    raise ValueError(f"sample: no renderer for anomaly class {label!r}; supported: {list(EVENTS)}")


# --------------------------------------------------------------------------- planning


@dataclass
class VideoPlan:
    """Everything needed to render one video and write its annotations."""

    vid: str
    split: str
    label: str
    number: int  # global index: seeds the video's own generator
    num_frames: int
    intervals: list[tuple[int, int]]  # inclusive frame ranges of the event


def _plan(cfg: SampleConfig) -> list[VideoPlan]:
    rng = np.random.default_rng([cfg.seed, 0])
    plans: list[VideoPlan] = []
    counts = (
        [("train", c, cfg.train_per_class) for c in cfg.anomaly_classes]
        + [("train", NORMAL_LABEL, cfg.train_normal)]
        + [("test", c, cfg.test_per_class) for c in cfg.anomaly_classes]
        + [("test", NORMAL_LABEL, cfg.test_normal)]
    )
    numbers: dict[str, int] = {}
    for split, label, count in counts:
        for _ in range(count):
            key = label if label != NORMAL_LABEL else f"{label}/{split}"
            numbers[key] = numbers.get(key, 0) + 1
            n = int(rng.integers(cfg.min_video_frames, cfg.max_video_frames + 1))
            intervals = [] if label == NORMAL_LABEL else _intervals(rng, n, split)
            plans.append(
                VideoPlan(video_id(label, numbers[key], split), split, label, len(plans), n, intervals)
            )
    return plans


def _intervals(rng: np.random.Generator, n: int, split: str) -> list[tuple[int, int]]:
    """Training events cover 40-80 % of the video; test videos have one or two intervals."""
    if split == "train":
        lengths = [round(rng.uniform(0.4, 0.8) * n)]
    elif rng.random() < 0.5:
        lengths = [round(rng.uniform(0.3, 0.6) * n)]
    else:
        lengths = [round(rng.uniform(0.2, 0.3) * n) for _ in range(2)]
    gap = round(rng.uniform(0.1, 0.2) * n) if len(lengths) == 2 else 0
    start = int(rng.integers(0, n - sum(lengths) - gap + 1))
    out = []
    for length in lengths:
        out.append((start, start + length - 1))
        start += length + gap
    return out


# --------------------------------------------------------------------------- rendering


def _norm_box(box: Box, w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [round(min(max(v / s, 0.0), 1.0), 4) for v, s in ((x1, w), (y1, h), (x2, w), (y2, h))]


def _render(plan: VideoPlan, cfg: SampleConfig, path: Path) -> dict:
    """Encode the video to ``path``; return its annotation record."""
    rng = np.random.default_rng([cfg.seed, 1, plan.number])
    w, h = cfg.width, cfg.height
    bg = _background(rng, w, h)
    colors = [str(c) for c in rng.permutation(list(PALETTE))]
    n_walkers = int(rng.integers(1, 4)) if plan.label == NORMAL_LABEL else int(rng.integers(1, 3))
    walker_colors = colors[-n_walkers:]  # the event's actors take colours from the front: never shared
    walkers = [
        Walker(
            PALETTE[c],
            x0=float(rng.uniform(0, w)),
            feet=float(rng.uniform(*band) * h),
            speed=float(rng.choice([-1, 1]) * rng.uniform(0.003, 0.007) * w),
            w=PERSON_W * w,
            h=PERSON_H * h,
        )
        for c, band in zip(walker_colors, [(0.38, 0.45), (0.86, 0.97), (0.38, 0.45)])
    ]
    event = None if plan.label == NORMAL_LABEL else _make_event(plan.label, rng, w, h, colors)

    # Keyframes: per region, its progress points in the first interval, plus one in the second.
    wanted: dict[int, list[tuple[int, str]]] = {}
    if event is not None:
        for r, (name, progresses) in enumerate(event.regions):
            points = [(0, p) for p in progresses] + ([(1, progresses[0])] if len(plan.intervals) > 1 else [])
            for i, p in points:
                s, e = plan.intervals[i]
                wanted.setdefault(s + round(p * (e - s)), []).append((r, name))
    box_infos: list[list[dict]] = [[] for _ in (event.regions if event else [])]

    # faststart: the index up front, as in files prepared for streaming
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=cfg.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # One thread: x264's output then depends on nothing but the input and options.
        stream.options = {"crf": "18", "preset": "ultrafast", "threads": "1"}
        for t in range(plan.num_frames):
            img = bg.copy()
            for walker in walkers:
                walker.draw(img, t)
            for s, e in plan.intervals:
                if s <= t <= e:
                    drawn = event.draw(img, (t - s) / max(e - s, 1), t)
                    for r, name in wanted.get(t, []):
                        box_infos[r].append({"frame": t, "bbox": _norm_box(drawn[name], w, h)})
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

    fill = dict(zip("ab", colors if event is not None else walker_colors))
    if event is not None:
        fill = {**fill, **event.colors}
        caption = str(rng.choice(GLOBAL_CAPTIONS[plan.label])).format(**fill)
        regions = [
            _region_caption(rng, name, cfg.region_paraphrases).format(**fill) for name, _ in event.regions
        ]
        timestamps = None
    else:
        key = "Normal" if n_walkers > 1 else "Normal1"
        caption = str(rng.choice(GLOBAL_CAPTIONS[key])).format(**fill)
        regions = [_region_caption(rng, "walker", cfg.region_paraphrases).format(a=c) for c in walker_colors]
        box_infos = []
        # The "meaningful part" of a normal video: most of it, trimmed at both ends.
        start = int(rng.integers(0, max(plan.num_frames // 10, 1)))
        end = plan.num_frames - 1 - int(rng.integers(0, max(plan.num_frames // 10, 1)))
        timestamps = [start / cfg.fps, end / cfg.fps]  # unrounded: rounding up could pass the last frame
    return {
        "video": plan.vid,
        "global_caption": caption,
        "region_captions": regions,
        "box_infos": box_infos,
        "timestamps": timestamps,
    }


def _plant_bad_boxes(records: list[dict], plans: list[VideoPlan]) -> int:
    """Append one bad keyframe of each kind to training anomalies (round robin over videos)."""
    targets = [(rec, plan) for rec, plan in zip(records, plans) if plan.split == "train" and plan.intervals]
    if not targets:  # a sample without anomaly classes has no boxes to spoil
        return 0
    for k, kind in enumerate(BAD_BOX_KINDS):
        rec, plan = targets[k % len(targets)]
        region = (k // len(targets)) % len(rec["box_infos"])
        good = rec["box_infos"][region][0]
        x1, y1, x2, y2 = good["bbox"]
        frame = min(good["frame"] + 1, plan.num_frames - 1)
        bbox = {
            "out_of_range": [x1, y1, 1.4, y2],
            "too_small": [
                min(x1, 0.9),
                min(y1, 0.9),
                round(min(x1, 0.9) + 0.04, 4),
                round(min(y1, 0.9) + 0.04, 4),
            ],
            "non_finite": [float("nan"), y1, x2, y2],
            "inverted": [x2, y1, x1, y2],
            "keyframe_out_of_range": [x1, y1, x2, y2],
        }[kind]
        if kind == "keyframe_out_of_range":
            frame = plan.num_frames + 5
        rec["box_infos"][region].append({"frame": frame, "bbox": bbox})
    return len(BAD_BOX_KINDS)


def _prepare_root(root: Path, data: DataConfig) -> Path:
    """Empty the videos dir of a previous sample; refuse to touch a dataset we did not write."""
    videos = root / data.videos_dir
    if videos.exists() and not (root / MARKER).exists():
        raise FileExistsError(
            f"{videos} exists but {root / MARKER} does not: refusing to overwrite a dataset "
            "that was not generated by `fgclip sample`"
        )
    shutil.rmtree(videos, ignore_errors=True)
    (root / MARKER).unlink(missing_ok=True)
    videos.mkdir(parents=True)
    return videos


def generate_sample(cfg: SampleConfig, data: DataConfig, root: Path) -> dict:
    """Write the synthetic UCF-Crime-style dataset under ``root``; return a summary."""
    if cfg.width % 2 or cfg.height % 2:
        raise ValueError(
            f"sample.width and sample.height must be even for yuv420p, got {cfg.width}x{cfg.height}"
        )
    unknown = sorted(set(cfg.anomaly_classes) - set(EVENTS))
    if unknown:
        raise ValueError(f"sample.anomaly_classes: no renderer for {unknown}; supported: {list(EVENTS)}")
    started = time.perf_counter()
    root = Path(root)
    videos = _prepare_root(root, data)
    plans = _plan(cfg)

    records = []
    for plan in plans:
        path = videos / plan.vid
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".mp4") as tmp:  # PyAV picks the muxer from the extension
            records.append(_render(plan, cfg, tmp))
    planted = _plant_bad_boxes(records, plans) if cfg.bad_boxes else 0

    for split, name in (("train", data.train_split), ("test", data.test_split)):
        write_text_atomic(root / name, "".join(f"{p.vid}\n" for p in plans if p.split == split))
    write_text_atomic(
        root / data.temporal_annotations,
        "".join(
            format_temporal_line(p.vid.rsplit("/", 1)[1], p.label, p.intervals) + "\n"
            for p in plans
            if p.split == "test"
        ),
    )
    # One record a line: readable, and diffs between two samples stay small.
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    write_text_atomic(root / data.annotations, f"[\n{lines}\n]\n")

    by_split: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for p in plans:
        by_split[p.split][p.label] = by_split[p.split].get(p.label, 0) + 1
    summary = {
        "root": str(root),
        "videos": len(plans),
        "frames": sum(p.num_frames for p in plans),
        "by_split": by_split,
        "bad_boxes": planted,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_text_atomic(
        # Without the wall time and the absolute root: the marker is part of the DVC
        # output, whose hash must not depend on the machine or the clone's path.
        root / MARKER,
        json.dumps({k: v for k, v in summary.items() if k not in ("seconds", "root")}, indent=1) + "\n",
    )
    logger.info(
        "sample: %d videos (%d train, %d test), %d frames, %d bad boxes planted -> %s in %.1fs",
        len(plans),
        sum(by_split["train"].values()),
        sum(by_split["test"].values()),
        summary["frames"],
        planted,
        root,
        summary["seconds"],
    )
    return summary
