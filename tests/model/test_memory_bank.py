"""Region memory bank: warm-up switch, ring buffer, state round trip."""

from __future__ import annotations

import logging

import pytest
import torch

from fgclip.model.memory_bank import RegionMemoryBank

LOGGER = "fgclip.model.memory_bank"


def _feats(n: int, start: int, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, dim)
    return rows.clone(), -rows, torch.arange(start, start + n)


def test_switches_on_after_warmup_with_exact_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bank = RegionMemoryBank(size=128, dim=4, warmup_steps=50, grad_accum_steps=8)
    for passes in range(1, 50):
        assert bank.begin_pass(passes) is False
        bank.enqueue(*_feats(3, 0))
        assert bank.negatives()[0].shape == (0, 4)
    assert int(bank.ptr) == 0 and int(bank.filled) == 0 and int(bank.enabled_at) == -1
    assert bank.begin_pass(50) is True
    assert caplog.messages == ["[Memory Bank] enabled @ training_step 50 (optimizer step 7)"]
    assert bank.state() == {
        "ptr": 0,
        "filled": 0,
        "enabled": True,
        "enabled_at": 50,
        "forward_passes": 50,
        "size": 128,
    }
    bank.enqueue(*_feats(3, 0))
    bank.begin_pass(51)
    assert int(bank.ptr) == 3 and bank.negatives()[0].shape == (3, 4)
    assert len(caplog.messages) == 1


@pytest.mark.parametrize(("warmup", "accum", "step"), [(48, 8, 6), (49, 8, 7), (1, 1, 1), (7, 2, 4)])
def test_reports_the_optimizer_step_in_progress(
    caplog: pytest.LogCaptureFixture, warmup: int, accum: int, step: int
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bank = RegionMemoryBank(size=4, dim=2, warmup_steps=warmup, grad_accum_steps=accum)
    for passes in range(1, warmup + 1):
        bank.begin_pass(passes)
    assert caplog.messages == [f"[Memory Bank] enabled @ training_step {warmup} (optimizer step {step})"]


def test_size_zero_never_switches_on() -> None:
    bank = RegionMemoryBank(size=0, dim=4, warmup_steps=0)
    for passes in range(1, 4):
        assert bank.begin_pass(passes) is False
    bank.enqueue(*_feats(2, 0))
    assert bank.negatives()[2].numel() == 0


def test_negatives_come_from_the_filled_part_only() -> None:
    bank = RegionMemoryBank(size=5, dim=4, warmup_steps=0)
    bank.begin_pass(1)
    bank.enqueue(*_feats(3, 10))
    img, txt, ids = bank.negatives()
    assert ids.tolist() == [[10, 10], [11, 11], [12, 12]]  # caption ids only: each row its own image id
    torch.testing.assert_close(img, _feats(3, 10)[0])
    torch.testing.assert_close(txt, _feats(3, 10)[1])


def test_wraps_around_when_a_batch_straddles_the_end() -> None:
    bank = RegionMemoryBank(size=5, dim=4, warmup_steps=0)
    bank.begin_pass(1)
    bank.enqueue(*_feats(3, 0))
    bank.enqueue(*_feats(4, 3))  # slots 3, 4, then 0, 1
    assert int(bank.ptr) == 2 and int(bank.filled) == 5
    assert bank.id_queue[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert bank.image_queue[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert bank.text_queue[:, 0].tolist() == [-5.0, -6.0, -2.0, -3.0, -4.0]
    bank.enqueue(*_feats(7, 100))  # more than the bank holds: the newest five survive, in ring order
    assert sorted(bank.id_queue[:, 0].tolist()) == [102, 103, 104, 105, 106]
    assert int(bank.ptr) == 2 and int(bank.filled) == 5


def test_enqueue_detaches() -> None:
    bank = RegionMemoryBank(size=4, dim=2, warmup_steps=0)
    bank.begin_pass(1)
    img = torch.ones(2, 2, requires_grad=True)
    bank.enqueue(img * 2, img * 3, torch.tensor([1, 2]))
    assert not bank.image_queue.requires_grad and bank.image_queue.grad_fn is None
    with pytest.raises(ValueError, match="as many"):
        bank.enqueue(img, img, torch.tensor([1]))


def test_state_dict_round_trip() -> None:
    bank = RegionMemoryBank(size=6, dim=4, warmup_steps=2, grad_accum_steps=2)
    for start in range(3):
        bank.begin_pass(start + 1)
        bank.enqueue(*_feats(4, 10 * start))
    state = bank.state_dict()
    assert {
        "image_queue",
        "text_queue",
        "id_queue",
        "ptr",
        "filled",
        "forward_passes",
        "enabled",
        "enabled_at",
    } <= set(state)
    restored = RegionMemoryBank(size=6, dim=4, warmup_steps=2, grad_accum_steps=2)
    restored.load_state_dict(state)
    assert (
        restored.state()
        == bank.state()
        == {
            "ptr": 2,
            "filled": 6,
            "enabled": True,
            "enabled_at": 2,
            "forward_passes": 3,
            "size": 6,
        }
    )
    for a, b in zip(restored.negatives(), bank.negatives()):
        assert torch.equal(a, b)
