"""Multi-node training under the real ``torchrun``: two "nodes" on 127.0.0.1, gloo on CPU.

Each node is one ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`` process
(its own session) running ``fgclip train --params``, the CLI as users run it. What is shown:

- the two nodes train what one process trains on the same global batch (``train.batch_size``
  doubled), tensor for tensor, and log the same losses;
- only the node whose worker is RANK 0 writes anything: checkpoints, the model, metrics and
  MLflow points (each node gets its own output paths, so a write by the other would show);
- SIGKILLing the RANK 1 node fails the other within seconds, and a rerun resumes from the
  last good checkpoint and finishes, with every MLflow step logged once;
- freezing its worker (SIGSTOP: its sockets stay open, nothing answers) fails the other
  once a collective has waited ``train.dist_timeout_s``;
- ranks that would resume from different checkpoints (unshared ``train.checkpoints``) stop.

Which node becomes RANK 0 is found out, never assumed: c10d rendezvous ignores
``--node-rank`` (torchrun says so) and ranks the nodes by their agents' (address, pid).
Every worker line carries its global rank (``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE`` with
``--tee 3``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from e2e_helpers import free_port, until
from mlflow import MlflowClient
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e

TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN_NAME = "two-node"
PER_NODE_BATCH = 2  # x 2 nodes = 4 of the tiny sample's 6 training videos per step
STEPS = 4  # optimizer steps of the comparison; the memory bank is on from the second
LR = 3e-4  # train.lr, one rate for every part (backbone_lr null)
KILL_STEPS = 40  # long enough that the kill, at the first checkpoint, lands mid-run (~0.1 s a step here)
NODE_TIMEOUT_S = 240  # a two-node run of this size takes 15-30 s on 2 busy cores
FAIL_WITHIN_S = 90  # the survivor of a killed node must be out by then (gloo's own timeout: 30 min)
# train.dist_timeout_s of the frozen-worker run: above any rank-0-only pause before the freeze
# (the MLflow run's start, the first checkpoint), with the store's schema made beforehand.
FROZEN_TIMEOUT_S = 30

# Float tolerance of two nodes against one process. gloo sums the two ranks' gradients
# and the losses gather features in another order than one process sums them, so the
# gradients differ in their 7th digit; AdamW divides each gradient by its own running
# RMS, so an element moves by about lr per step whatever its gradient's size, and its
# update carries that relative difference (observed: <= 1e-6 after 4 steps). 1e-5 is
# 1/30 of one step's travel and 100x below what the old mean-of-rank-means objective
# moved the weights away (1.3e-3 after 4 steps).
WEIGHT_ATOL = 1e-5
# Attention key biases have a gradient of exactly zero (softmax ignores a shift that is
# the same for every key of a query), so what they get is rounding noise, and AdamW
# makes each noise gradient a step of about lr: they are not trained, only jittered, and
# may end up to 2 x STEPS x lr apart. They say nothing about the objective.
KEY_BIAS = re.compile(r"self_attn\.k_proj\.bias$")
PACKED_IN_PROJ_BIAS = re.compile(r"self_attn\.in_proj_bias$")  # nn.MultiheadAttention: [q | k | v]
GRADIENT_FREE_ATOL = 2 * STEPS * LR


@pytest.fixture(scope="module")
def base_params(train_params, tiny_clip, tiny_frames: Path, tiny_boxes: Path) -> dict:
    """The tiny training params as a params.yaml holds them, the inputs as absolute paths."""
    params = train_params(train={"run_name": RUN_NAME, "lr": LR, "checkpoint_every": 2})
    raw = params.model_dump(mode="json", exclude={"base_dir"})
    raw["frames"]["out"], raw["boxes"]["out"] = str(tiny_frames), str(tiny_boxes)
    raw["pretrain"]["out"] = str(tiny_clip[0])
    return raw


def write_params(directory: Path, base: dict, **train) -> Path:
    """``directory/params.yaml``: every output relative to it, its own MLflow store."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = {**base, "train": {**base["train"], **train}}
    raw["tracking"] = {**base["tracking"], "uri": f"sqlite:///{directory / 'mlflow.db'}"}
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = "[rank${rank}]:"  # with --tee 3: every worker line
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FGCLIP_FAULT_NAN_AT_STEP"):
        env.pop(name, None)
    return env


def node_command(port: int, rdzv_id: str, node_rank: int, params: Path) -> list[str]:
    """One node of a two-node run: what a user types on each machine (there, not 127.0.0.1)."""
    return [
        str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
        "--node-rank", str(node_rank), "--tee", "3",
        "-m", "fgclip.cli", "train", "--params", str(params),
    ]  # fmt: skip


@dataclass
class Node:
    proc: subprocess.Popen
    params: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rank(self) -> int | None:
        """Its worker's global rank, from the prefix of the worker's lines (None before any)."""
        found = {int(r) for r in re.findall(r"^\[rank(\d+)\]:", self.output(), re.MULTILINE)}
        assert len(found) <= 1, f"{self.log}: lines of ranks {sorted(found)} from one single-process node"
        return found.pop() if found else None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.log.name} still running after {timeout:.0f} s:\n{self.output()[-3000:]}")


def start_nodes(params: list[Path], logs: Path, tag: str) -> list[Node]:
    """Both nodes of one run (``params[i]`` for node i), each in its own session."""
    port, nodes = free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for node_rank, path in enumerate(params):
        log = logs / f"{tag}-node{node_rank}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                node_command(port, f"{tag}-{port}", node_rank, path), cwd=path.parent, env=_env(),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        nodes.append(Node(proc, path, log))
    return nodes


def signal_node(proc: subprocess.Popen, sig: signal.Signals, *, workers_only: bool = False) -> None:
    """Send ``sig`` to a whole node (torchrun's process group and each of its workers'), or its workers'.

    torchrun starts every worker in a session of its own: signalling torchrun's group
    alone leaves the worker training on, and the other node never notices. A node that
    has exited is left alone (its pid may be another process's by now).
    """
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    groups = {proc.pid}
    for child in children:
        try:
            groups.add(os.getpgid(child.pid))
        except ProcessLookupError:
            pass
    if workers_only:
        groups.discard(proc.pid)
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node as a machine dies (a stopped node too), and reap it."""
    signal_node(proc, signal.SIGKILL)
    proc.wait(timeout=30)


def by_rank(nodes: list[Node]) -> tuple[Node, Node]:
    """``(rank-0 node, rank-1 node)``, as the rendezvous made them."""
    ranks = [node.rank() for node in nodes]
    assert sorted(ranks) == [0, 1], f"worker ranks {ranks}"
    return nodes[ranks.index(0)], nodes[ranks.index(1)]


def finished(nodes: list[Node], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [node.wait(max(1.0, deadline - time.monotonic())) for node in nodes]


def single_process(params: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fgclip.cli", "train", "--params", str(params)], cwd=params.parent,
            env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def metric_steps(tracking_uri: str, experiment: str, key: str = "train/loss") -> tuple[str, list[int]]:
    """The one run of the experiment and the steps of its ``key`` history, sorted."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=10)
    assert len(runs) == 1, f"{len(runs)} MLflow runs: {[r.info.run_id for r in runs]}"
    return runs[0].info.status, sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key))


def loss_rows(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@dataclass
class ComparisonRun:
    root: Path
    main: Path  # the rank-0 node's directory
    other: Path  # the rank-1 node's
    single: Path
    outputs: tuple[str, str]  # (rank-0 node's, rank-1 node's) console output
    ranks: dict[str, int]  # node directory name -> its worker's rank


@pytest.fixture(scope="module")
def comparison(base_params: dict, tmp_path_factory: pytest.TempPathFactory) -> ComparisonRun:
    """Two nodes at PER_NODE_BATCH (each its own output paths) and one process at twice that, at once."""
    root = tmp_path_factory.mktemp("two-node")
    single = write_params(root / "single", base_params, batch_size=2 * PER_NODE_BATCH, max_steps=STEPS)
    node_params = [
        write_params(root / f"node{i}", base_params, batch_size=PER_NODE_BATCH, max_steps=STEPS) for i in (0, 1)
    ]
    one = single_process(single, root / "single.log")
    nodes = start_nodes(node_params, root / "logs", "compare")
    try:
        assert finished(nodes, NODE_TIMEOUT_S) == [0, 0], "\n\n".join(n.output()[-3000:] for n in nodes)
        assert one.wait(timeout=NODE_TIMEOUT_S) == 0, (root / "single.log").read_text()[-3000:]
    finally:
        for node in nodes:
            kill_node(node.proc)
        kill_node(one)
    main, other = by_rank(nodes)
    return ComparisonRun(
        root, main.params.parent, other.params.parent, single.parent,
        (main.output(), other.output()), {f"node{i}": nodes[i].rank() for i in (0, 1)},
    )  # fmt: skip


def test_node_rank_is_ignored_by_c10d_rendezvous(comparison: ComparisonRun) -> None:
    # Each node was told its --node-rank, and torchrun says it ignores a non-zero one (it
    # is silent about 0): the ranks come from the rendezvous, so the tests read them from
    # the workers' lines.
    warning = "node_rank is only used for static rdzv_backend. It will be ignored for rdzv_backend=c10d"
    logs = comparison.root / "logs"
    assert warning in (logs / "compare-node1.log").read_text()
    assert warning not in (logs / "compare-node0.log").read_text()
    assert sorted(comparison.ranks.values()) == [0, 1]


def test_two_nodes_train_what_one_process_trains_on_the_same_global_batch(comparison: ComparisonRun) -> None:
    two = load_file(comparison.main / "models" / "fgclip" / "model.safetensors")
    one = load_file(comparison.single / "models" / "fgclip" / "model.safetensors")
    pretrained = yaml.safe_load((comparison.single / "params.yaml").read_text())["pretrain"]["out"]
    start = load_file(Path(pretrained) / "model.safetensors")  # the CLIP both started from
    assert two.keys() == one.keys()
    gradient_free = []
    for name, tensor in one.items():
        diff = (two[name].double() - tensor.double()).abs()
        if KEY_BIAS.search(name):
            gradient_free.append(name)
            assert diff.max() <= GRADIENT_FREE_ATOL, name
            continue
        if PACKED_IN_PROJ_BIAS.search(name):  # its key third is gradient-free, the rest is not
            gradient_free.append(name)
            third = tensor.shape[0] // 3
            assert diff[third : 2 * third].max() <= GRADIENT_FREE_ATOL, name
            diff = torch.cat([diff[:third], diff[2 * third :]])
        assert diff.max() <= WEIGHT_ATOL, f"{name}: {diff.max():.3g} apart"
    # The comparison has teeth: one text, one vision and one temporal layer; the weights moved.
    assert len(gradient_free) == 3, gradient_free
    moved = max((one[f"clip.{n}"].double() - t.double()).abs().max() for n, t in start.items() if "scale" not in n)
    assert moved > 50 * WEIGHT_ATOL  # observed 9e-4: 4 AdamW steps of up to lr, one in warm-up

    summaries = [json.loads((d / "metrics" / "train.json").read_text()) for d in (comparison.main, comparison.single)]
    for scale in ("logit_scale_global", "logit_scale_region", "logit_scale_hardneg"):
        assert summaries[0][scale] == pytest.approx(summaries[1][scale], abs=WEIGHT_ATOL), scale
    assert summaries[0]["memory_bank"] == summaries[1]["memory_bank"]
    # The logged losses are the whole batch's (the mean of the ranks' shares), as one process logs them.
    rows = [loss_rows(d / "plots" / "train_loss.csv") for d in (comparison.main, comparison.single)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == list(range(1, STEPS + 1))
    for two_row, one_row in zip(*rows):
        assert two_row == pytest.approx(one_row, rel=1e-4, abs=1e-5)


def test_only_the_rank_0_node_writes(comparison: ComparisonRun) -> None:
    # Each node had its own output paths and MLflow store: the rank-1 node's hold nothing.
    assert sorted(p.name for p in comparison.other.rglob("*")) == ["params.yaml"]
    main = comparison.main
    for written in ("models/fgclip/model.safetensors", "metrics/train.json", "metrics/health.json",
                    "plots/train_loss.csv", "plots/train_loss.png", "mlflow.db"):  # fmt: skip
        assert (main / written).is_file(), written
    checkpoints = sorted(p.name for p in (main / "checkpoints" / RUN_NAME).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-000002", "checkpoint-000004"]
    status, steps = metric_steps(f"sqlite:///{main / 'mlflow.db'}", "train-tests")
    assert status == "FINISHED" and steps == list(range(1, STEPS + 1))
    rank0, rank1 = comparison.outputs
    assert [rank0.count(f"[LOSS] step={s} ") for s in range(1, STEPS + 1)] == [1] * STEPS
    assert "[LOSS]" not in rank1


def test_ranks_resuming_from_different_checkpoints_stop(comparison: ComparisonRun, tmp_path: Path) -> None:
    # A rerun of the comparison's nodes: one finds its checkpoint at step 4, the other none
    # (train.checkpoints not shared). Both must stop before training, saying why.
    copies = []
    for node in (comparison.main, comparison.other):
        raw = yaml.safe_load((node / "params.yaml").read_text())
        copies.append(write_params(tmp_path / node.name, raw))
        if node == comparison.main:
            shutil.copytree(node / "checkpoints", tmp_path / node.name / "checkpoints")
    nodes = start_nodes(copies, tmp_path / "logs", "unshared")
    try:
        codes = finished(nodes, NODE_TIMEOUT_S)
    finally:
        for node in nodes:
            kill_node(node.proc)
    assert all(code != 0 for code in codes), codes
    for node in nodes:
        # The CLI's one-line error (ResumeMismatchError), on both nodes.
        assert "fgclip train: error: the ranks would start from different optimizer steps" in node.output()
    assert not (tmp_path / comparison.main.name / "models").exists()


@dataclass
class MidRun:
    params: Path
    run_dir: Path  # its checkpoints
    survivor: Node  # the RANK 0 node
    victim: Node


@contextmanager
def two_nodes_past_the_first_checkpoint(base_params: dict, tmp_path: Path, tag: str, **train) -> Iterator[MidRun]:
    """A KILL_STEPS run on two nodes sharing one params file (the checkpoints, and here
    everything, on a shared filesystem), yielded once its first checkpoint is written and both
    workers' ranks are known; both nodes are killed on the way out."""
    params = write_params(tmp_path / "run", base_params, batch_size=PER_NODE_BATCH, max_steps=KILL_STEPS, **train)
    # The MLflow store's schema first: made by rank 0 alone it takes seconds the other rank
    # waits through in a collective, which a short train.dist_timeout_s would count.
    MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}").search_experiments()
    run_dir = tmp_path / "run" / "checkpoints" / RUN_NAME
    nodes = start_nodes([params, params], tmp_path / "logs", tag)
    try:
        until("the first checkpoint", lambda: any(run_dir.glob("checkpoint-*/meta.json")), NODE_TIMEOUT_S)
        until("both workers' ranks", lambda: all(n.rank() is not None for n in nodes), 30)
        yield MidRun(params, run_dir, *by_rank(nodes))
    finally:
        for node in nodes:
            kill_node(node.proc)


def test_a_killed_node_fails_the_other_and_a_rerun_resumes(base_params: dict, tmp_path: Path) -> None:
    with two_nodes_past_the_first_checkpoint(base_params, tmp_path, "kill") as run:
        kill_node(run.victim.proc)
        killed_at = time.monotonic()
        code = run.survivor.wait(FAIL_WITHIN_S)
        took = time.monotonic() - killed_at
    params, run_dir, survivor = run.params, run.run_dir, run.survivor
    assert code != 0 and took < FAIL_WITHIN_S
    # The survivor's worker says what happened: its peer's connection went away mid-collective.
    assert re.search(r"^\[rank0\]:.*(Connection (reset|closed) by peer|Broken pipe)", survivor.output(), re.MULTILINE), (
        survivor.output()[-3000:]
    )
    assert not (tmp_path / "run" / "models").exists()  # it stopped before the end
    good = max(int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoint-*/meta.json"))
    assert good < KILL_STEPS

    nodes = start_nodes([params, params], tmp_path / "logs", "rerun")
    try:
        assert finished(nodes, NODE_TIMEOUT_S) == [0, 0], "\n\n".join(n.output()[-3000:] for n in nodes)
    finally:
        for node in nodes:
            kill_node(node.proc)
    rank0, _ = by_rank(nodes)
    resumed = f"Resuming from {run_dir / f'checkpoint-{good:06d}'} (optimizer step {good},"
    assert re.search(rf"^\[rank0\]:.*{re.escape(resumed)}", rank0.output(), re.MULTILINE), rank0.output()[-3000:]
    summary = json.loads((tmp_path / "run" / "metrics" / "train.json").read_text())
    assert (summary["start_step"], summary["steps"]) == (good, KILL_STEPS)
    status, steps = metric_steps(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}", "train-tests")
    assert status == "FINISHED" and steps == list(range(1, KILL_STEPS + 1))


def test_a_frozen_worker_fails_the_other_after_the_dist_timeout(base_params: dict, tmp_path: Path) -> None:
    # A worker that stops answering without closing its connections (a hung GPU, a
    # deadlock, a partition) is only noticed by the collectives' timeout:
    # train.dist_timeout_s. Its torchrun agent stays up: had the whole node frozen and it
    # hosted the c10d rendezvous store, the other agents would wait on that store (60 s a
    # call, torchrun's) after their own worker failed, which is torchrun's to time out.
    with two_nodes_past_the_first_checkpoint(base_params, tmp_path, "frozen", dist_timeout_s=FROZEN_TIMEOUT_S) as run:
        signal_node(run.victim.proc, signal.SIGSTOP, workers_only=True)
        frozen_at = time.monotonic()
        code = run.survivor.wait(FROZEN_TIMEOUT_S + FAIL_WITHIN_S)
        took = time.monotonic() - frozen_at
        assert run.victim.proc.poll() is None  # its worker still there, frozen: nothing closed its sockets
    survivor = run.survivor
    assert code != 0
    # It waited for the timeout (less the part of a step the peer froze in), not a reset.
    assert FROZEN_TIMEOUT_S / 2 <= took < FROZEN_TIMEOUT_S + FAIL_WITHIN_S, took
    output = survivor.output()
    # gloo's words for its timeout depend on where the collective waited.
    timed_out = r"^\[rank0\]:.*(Timed out waiting|Application timeout caused pair closure)"
    assert re.search(timed_out, output, re.MULTILINE), output[-3000:]
    assert not re.search(r"Connection (reset|closed) by peer|Broken pipe", output)
    assert not (tmp_path / "run" / "models").exists()
