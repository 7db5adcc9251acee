"""TrainStep: the one optimizer step that training runs and the throughput benchmark times."""

from __future__ import annotations

import copy
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from fgclip.data.batch import collate
from fgclip.data.dataset import EpochBatchSampler, VideoClipDataset
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.losses import FGCLIPLoss
from fgclip.model.tokenizer import load_tokenizer
from fgclip.train.step import NonFiniteValue, TrainStep

CPU = torch.device("cpu")
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def setup(train_params, tiny_clip, tiny_frames, tiny_boxes):
    """Params with a bank that switches on at forward pass 3 of 2-pass steps, and real batches."""
    params = train_params(
        train={"grad_accum_steps": 2, "memory_bank_warmup_steps": 3, "memory_bank_size": 64}
    )
    data = VideoClipDataset(params, tiny_frames, tiny_boxes, load_tokenizer(tiny_clip[0]))
    sampler = EpochBatchSampler(len(data), params.train.batch_size, params.train.seed)
    batches = [collate([data[key] for key in keys]) for keys in sampler]
    assert len(batches) >= 2
    return params, tiny_clip[0], batches


def _trainer(params, clip_dir) -> TrainStep:
    torch.manual_seed(0)
    model = FGCLIPVideoModel.from_clip(
        clip_dir, params.model, source=clip_dir, tolerance=params.train.health.logit_scale_tolerance
    ).train()
    return TrainStep.build(model, params.train, CPU)


def test_bank_switches_on_at_the_steps_pass_count_and_never_holds_the_current_batch(setup) -> None:
    params, clip_dir, batches = setup
    trainer = _trainer(params, clip_dir)
    stream = itertools.cycle(batches)
    trainer(stream)  # passes 1 and 2: warming up
    assert trainer.forward_passes == 2 and not trainer.bank.is_enabled and int(trainer.bank.filled) == 0
    second = trainer(stream)  # pass 3 switches the bank on (nothing queued yet), pass 4 sees pass 3's regions
    assert trainer.forward_passes == 4
    assert trainer.bank.state()["enabled_at"] == 3 and trainer.bank.state()["forward_passes"] == 4
    regions_of_pass_4 = second.last.regions.ids.shape[0]
    filled = int(trainer.bank.filled)
    assert 0 < regions_of_pass_4 < filled <= 64
    # Pass 4's columns: its own regions and the bank as it was before pass 4 queued them.
    assert second.last.logits_i2t.shape[1] == regions_of_pass_4 + (filled - regions_of_pass_4)
    assert second.last.logits_i2t.shape[1] == filled


def test_step_losses_are_the_loss_of_its_batches(setup) -> None:
    params, clip_dir, batches = setup
    trainer = _trainer(params, clip_dir)
    before = copy.deepcopy(trainer.model)
    result = trainer(iter(batches))
    # Reference: the same model's loss on each of the step's two batches (bank still off), averaged.
    loss_fn = FGCLIPLoss(params.train.region_loss_weight, params.train.hardneg_loss_weight)
    with torch.no_grad():
        passes = [loss_fn(before(batch)) for batch in batches[:2]]
    assert all(p.loss_hardneg.item() > 0 for p in passes)  # the sample's regions carry negatives
    for name in ("loss", "loss_global", "loss_region", "loss_hardneg"):
        expected = sum(getattr(p, name).item() for p in passes) / 2
        assert result.losses[name] == pytest.approx(expected, rel=1e-5)
    assert result.grad_norm > 0 and result.lr == pytest.approx(params.train.lr / params.train.warmup_steps)
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert {"logit_scale_region", "logit_scale_hardneg"} <= set(moved) and len(moved) > 10
    assert trainer.model.logit_scale_global.item() <= params.model.logit_scale_max


def test_non_finite_loss_raises_before_anything_is_updated(setup) -> None:
    params, clip_dir, batches = setup
    trainer = _trainer(params, clip_dir)
    weights = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(NonFiniteValue) as err:
        trainer(iter(batches), inject_nan=True)
    assert err.value.what == "loss" and err.value.value != err.value.value  # NaN
    assert trainer.forward_passes == 0 and trainer.optimizer.state_dict()["state"] == {}
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())


def test_throughput_benchmark_times_the_training_step(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark builds its step with TrainStep.build from params and runs TrainStep itself."""
    params, clip_dir, batches = setup
    spec = importlib.util.spec_from_file_location("train_throughput", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    original = TrainStep.__call__

    def counted(self, batches, **kwargs):
        calls.append(self)
        return original(self, batches, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", counted)
    clip = FGCLIPVideoModel.from_clip(
        clip_dir, params.model, source=clip_dir, tolerance=params.train.health.logit_scale_tolerance
    ).clip
    step = bench.fgclip_step_fn(params.model, params.train, clip.config, batches[0], CPU)
    losses = [step() for _ in range(2)]
    assert len(calls) == 2 and calls[0] is calls[1] and all(torch.isfinite(loss) for loss in losses)
    assert calls[0].grad_accum_steps == params.train.grad_accum_steps


def _states_equal(a: TrainStep, b: TrainStep) -> bool:
    weights = all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    opt_a, opt_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    moments = opt_a.keys() == opt_b.keys() and all(
        torch.equal(opt_a[i][key], opt_b[i][key]) for i in opt_a for key in opt_a[i]
    )
    return weights and moments


def test_unsynced_steps_give_the_weights_and_losses_of_synced_ones(setup) -> None:
    """train.sync_every > 1 only moves the host reads: same weights, moments and float losses."""
    params, clip_dir, batches = setup
    synced, lazy = _trainer(params, clip_dir), _trainer(params, clip_dir)
    stream_a, stream_b = itertools.cycle(batches), itertools.cycle(batches)
    reference = [synced(stream_a) for _ in range(3)]
    first, second = lazy(stream_b, sync=False), lazy(stream_b, sync=False)
    assert first.losses is None and first.grad_norm is None and first.scales is None
    assert lazy.backlog == [first, second]
    third = lazy(stream_b, sync=True)
    assert lazy.backlog == [] and third.earlier == [first, second]
    for ref, got in zip(reference, (first, second, third)):
        assert got.losses == ref.losses and got.grad_norm == ref.grad_norm and got.scales == ref.scales
        assert got.pending is None
    assert lazy.forward_passes == synced.forward_passes == 6
    assert _states_equal(synced, lazy)


def test_nan_in_an_unsynced_step_raises_at_the_next_sync(setup) -> None:
    params, clip_dir, batches = setup
    trainer = _trainer(params, clip_dir)
    stream = itertools.cycle(batches)
    good = trainer(stream, sync=False)
    trainer(stream, sync=False, inject_nan=True)  # nothing is read: no raise, the weights move
    trainer(stream, sync=False)
    with pytest.raises(NonFiniteValue) as err:
        trainer(stream, sync=True)
    # Found at the sync, before it runs: the bad step was 2 calls back, step 1 was finite.
    assert err.value.what == "loss" and err.value.value != err.value.value
    assert err.value.steps_back == 2 and err.value.earlier == [good] and good.losses is not None
    assert trainer.forward_passes == 6 and trainer.backlog == []  # the sync step itself never ran


def test_attention_implementation_is_set_from_params(setup) -> None:
    params, clip_dir, _ = setup
    for impl in ("eager", "sdpa"):
        trainer = _trainer(params.with_overrides(train={"attn_implementation": impl}), clip_dir)
        clip = trainer.model.clip
        assert {clip.config._attn_implementation, clip.vision_model.config._attn_implementation,
                clip.text_model.config._attn_implementation} == {impl}  # fmt: skip


# Inductor cannot lower the hard-negative index_put's backward (nonzero) and falls back there,
# after autograd's anomaly mode (on while AOTAutograd traces) has printed the failed attempt.
@pytest.mark.filterwarnings("ignore:Error detected in IndexPutBackward0")
def test_compiled_step_runs_on_cpu_and_matches_eager(setup) -> None:
    """train.compile: one CPU step through torch.compile (inductor needs a C++ compiler)."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler: no g++ / c++ on PATH")
    params, clip_dir, batches = setup
    compiled = _trainer(params.with_overrides(train={"compile": True}), clip_dir)
    eager = _trainer(params, clip_dir)
    try:
        got = compiled(iter(batches))
        ref = eager(iter(batches))
    finally:
        torch._dynamo.reset()
    assert compiled._compiled is not None
    for name, value in ref.losses.items():
        assert got.losses[name] == pytest.approx(value, rel=1e-4, abs=1e-5)
