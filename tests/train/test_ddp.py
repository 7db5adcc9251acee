"""Two-process DDP training on CPU (gloo) under a real ``torchrun``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

# What each torchrun worker runs: the library's train() on the tiny sample; it
# records its own summary so the test can compare ranks.
WORKER = """
import json, logging, os, sys
from pathlib import Path
from fgclip.config import Params
from fgclip.train.loop import train

logging.basicConfig(level=logging.INFO)
args = json.loads(sys.argv[1])
params = Params.model_validate({**args["params"], "base_dir": args["base"]})
root = Path(args["root"])
summary = train(params, Path(args["frames"]), Path(args["boxes"]), args["clip"], root / "out",
                root / "checkpoints", root / "health.json", metrics_path=root / "train.json",
                loss_csv=root / "loss.csv")
rank = os.environ["RANK"]
(root / f"summary-{rank}.json").write_text(json.dumps(summary, default=str))
"""



def _run_two_ranks(
    worker: str, params, tmp_path: Path, frames: Path, boxes: Path, clip: Path
) -> subprocess.CompletedProcess:
    """``worker``'s source under ``torchrun --standalone --nproc_per_node=2``, on one thread each."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    args = {
        "params": params.model_dump(mode="json", exclude={"base_dir"}),
        "base": str(params.base_dir),
        "root": str(tmp_path),
        "frames": str(frames),
        "boxes": str(boxes),
        "clip": str(clip),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("FGCLIP_FAULT_NAN_AT_STEP", None)  # the fault worker sets it on its rank alone
    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), json.dumps(args)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

def test_two_process_gloo_run(
    train_params, tiny_clip, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path, tracking_uri: str
) -> None:
    params = train_params(train={"max_steps": 2, "batch_size": 2, "run_name": "ddp"})
    proc = _run_two_ranks(WORKER, params, tmp_path, tiny_frames, tiny_boxes, tiny_clip[0])
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"summary-{r}.json").read_text()) for r in (0, 1)]
    # Gradients are all-reduced: both ranks end with the same parameters ...
    assert ranks[0]["logit_scale_region"] == ranks[1]["logit_scale_region"]
    assert ranks[0]["memory_bank"] == ranks[1]["memory_bank"]
    # ... and log the same losses: the whole batch's, averaged over the ranks' shares (that
    # the ranks trained on different shards, equal to one process on both, is
    # tests/e2e/test_two_node_torchrun.py's).
    assert ranks[0]["final"] == ranks[1]["final"]
    # Only rank 0 writes files and tracks.
    assert ranks[1]["run_id"] is None and ranks[0]["run_id"] is not None
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "loss.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "ddp").iterdir()) == ["checkpoint-000002"]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [ranks[0]["experiment_id"]], filter_string="attributes.run_name = 'ddp'", max_results=10
    )
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]]
    assert sorted(m.step for m in client.get_metric_history(ranks[0]["run_id"], "train/loss")) == [1, 2]
    # Rank 0 alone logs the [LOSS] lines.
    assert proc.stderr.count("[LOSS] step=2 ") == 1


# A NaN on rank 1 only, in a step that does not read its values (train.sync_every 3):
# both ranks must stop at the step-3 read, naming step 1, or one would hang in a collective.
FAULT_WORKER = """
import json, os, sys
from pathlib import Path
from fgclip.config import Params
from fgclip.train.loop import FAULT_ENV, NonFiniteLossError, train

args = json.loads(sys.argv[1])
rank = os.environ["RANK"]
if rank == "1":
    os.environ[FAULT_ENV] = "1"
params = Params.model_validate({**args["params"], "base_dir": args["base"]})
root = Path(args["root"])
try:
    train(params, Path(args["frames"]), Path(args["boxes"]), args["clip"], root / "out",
          root / "checkpoints", root / "health.json", metrics_path=root / "train.json",
          loss_csv=root / "loss.csv")
    outcome = {"stopped": False}
except NonFiniteLossError as err:
    outcome = {"stopped": True, "step": err.step, "what": err.what}
(root / f"outcome-{rank}.json").write_text(json.dumps(outcome))
"""


def test_unsynced_nan_on_one_rank_stops_every_rank_at_the_same_step(
    train_params, tiny_clip, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path
) -> None:
    params = train_params(
        train={"max_steps": 3, "batch_size": 2, "run_name": "ddp-sync", "sync_every": 3, "checkpoint_every": 3}
    )
    proc = _run_two_ranks(FAULT_WORKER, params, tmp_path, tiny_frames, tiny_boxes, tiny_clip[0])
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcomes = [json.loads((tmp_path / f"outcome-{r}.json").read_text()) for r in (0, 1)]
    assert [o["stopped"] for o in outcomes] == [True, True]
    assert [o["step"] for o in outcomes] == [1, 1]
    assert outcomes[1]["what"] == "loss"  # rank 0 saw it through the all-reduced gradients, or the flag
    assert not (tmp_path / "checkpoints" / "ddp-sync").exists() or not any(
        (tmp_path / "checkpoints" / "ddp-sync").glob("checkpoint-*")
    )
