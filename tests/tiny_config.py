"""Tiny model and sample sizes shared by the test packages (imported as ``tiny_config``).

One definition, so a change to the tiny architecture (or a new required knob)
happens in one place for unit, stage and end-to-end tests alike.
"""

# A 32-px, one-layer CLIP: every code path of the real model, seconds to train on CPU.
TINY_MODEL = {
    "image_size": 32,
    "patch_size": 8,
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden": 32,
    "text_layers": 1,
    "text_heads": 2,
    "projection_dim": 32,
    "max_text_len": 16,
    "temporal_layers": 1,
    "temporal_heads": 2,
}

# The smallest sample with both anomaly and normal videos in each split, for tests
# that run real `dvc repro` / Prefect flows in a scratch repository.
TINY_REPO_SAMPLE = {
    "anomaly_classes": ["Arson", "RoadAccidents"],
    "train_per_class": 3,
    "test_per_class": 1,
    "train_normal": 3,
    "test_normal": 1,
    "min_video_frames": 48,
    "max_video_frames": 72,
    "width": 96,
    "height": 72,
}

# Training of that model on the tiny sample: a few steps, checkpoints, the bank switching on.
TINY_TRAIN = {
    "num_frames": 4,
    "max_keyframes": 2,
    "max_regions": 3,
    "batch_size": 3,
    "max_steps": 4,
    "warmup_steps": 1,
    "memory_bank_size": 8,
    "memory_bank_warmup_steps": 2,
    "num_workers": 0,
    "checkpoint_every": 2,
    "device": "cpu",
}
