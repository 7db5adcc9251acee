"""Hard-negative accuracy of a model trained before hard negatives existed (session 5's before/after
comparison, since replaced in the README by the ablation grid, whose global-only and memory-bank cells
are trained without the hard-negative loss and scored by the evaluate stage itself).

Run it with the OLD code on the path, from a clone at f6e31bd that has run `dvc repro`:

    PYTHONPATH=/path/to/old-clone .venv/bin/python benchmarks/old_model_hardneg.py \
        /path/to/old-clone /path/to/new-clone/data/boxes

The old code has no hard negatives: this reads the regions of the old clone's box shards
(test split) in the old code's order, attaches the negatives that the new validate_boxes
stage generated for the same (video, region) (read straight from the new shards with
pyarrow), and scores them with the old model's own region and text paths: a region wins
when its caption is more similar to its feature than each of its negatives.
"""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

from fgclip.eval.region_metrics import load_held_out, region_embeddings
from fgclip.eval.zeroshot import text_embeddings
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.tokenizer import load_tokenizer

old_root, new_boxes = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((new_boxes / "manifest.json").read_text())
neg = {}
for shard in manifest["shards"]:
    t = pq.read_table(new_boxes / shard["path"], columns=["video", "region", "region_negatives", "split"])
    for row in t.to_pylist():
        if row["split"] == "test":
            neg[(row["video"], row["region"])] = row["region_negatives"]
videos = sorted({v for v, _ in neg})
held = load_held_out(old_root / "data/boxes", old_root / "data/frames", videos)
model = FGCLIPVideoModel.from_pretrained(old_root / "models/fgclip").eval()
tok = load_tokenizer(old_root / "models/fgclip")
[feats] = region_embeddings([model], held, 64)
wins, m = [], 0
with torch.no_grad():
    for v in held:
        # regions in load_held_out's order: sorted region indices of the video
        table_regions = sorted(r for (vid, r) in neg if vid == v.video)
        for r_index, caption in zip(table_regions, v.region_captions):
            n = neg[(v.video, r_index)]
            if n:
                own = text_embeddings(model, tok, [caption], model.cfg.max_text_len, 64)[0] @ feats[m]
                others = text_embeddings(model, tok, n, model.cfg.max_text_len, 64) @ feats[m]
                wins.append(bool((own > others).all()))
            m += 1
print(json.dumps({"hardneg_accuracy": sum(wins) / len(wins), "regions": len(wins)}))
