"""Tiny model settings shared by the model tests and their fixtures."""

from __future__ import annotations

CAPTIONS = [
    "a man attacks a woman inside a shop",
    "a man pulls the woman's red bag",
    "another man hits her",
    "the woman falls",
    "a car crashes into another car",
    "people walk along the street",
    "一个男人在商店里攻击一个女人",
]

TINY = {
    "image_size": 32,
    "patch_size": 8,
    "vision_hidden": 32,
    "vision_layers": 2,
    "vision_heads": 2,
    "text_hidden": 32,
    "text_layers": 2,
    "text_heads": 2,
    "projection_dim": 16,
    "max_text_len": 12,
    "temporal_layers": 2,
    "temporal_heads": 2,
    "max_frames": 8,
}
