"""FLOP accounting of the pretraining model: a hand count for the tiny config, torch's own FLOP
counter on a real forward and training step of the tiny model, peaks by device and MFU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import random_pretraining_samples
from vilbert.config import BertConfig
from vilbert.datasets.concept_cap import collate_pretraining
from vilbert.flops import batch_flops, estimate_mfu, peak_flops, pretraining_flops
from vilbert.modeling import InterBertForMultiModalPreTraining
from vilbert.pretraining import model_inputs

TINY = Path(__file__).parent.parent / "config" / "interbert_tiny.json"


@pytest.fixture(scope="module")
def config() -> BertConfig:
    return BertConfig.from_json_file(TINY)


def test_hand_count_of_the_tiny_config(config: BertConfig) -> None:
    # Tiny: hidden 64, intermediate 128, 2 interaction + 1 text + 1 image layer, 64-d regions,
    # 41 classes, vocabulary 30522, bi_hidden 64. A batch padded to 12 tokens and 9 regions.
    def layer(length: int) -> int:  # Q, K, V, output; feed-forward pair; scores and context
        return 2 * (4 * length * 64 * 64 + 2 * length * 64 * 128 + 2 * length * length * 64)

    assert layer(21) == 1_489_152 and layer(12) == 823_296 and layer(9) == 610_560
    image_embedding = 2 * 9 * (64 + 5) * 64  # 79,488
    encoder = 2 * 1_489_152 + 823_296 + 610_560  # 4,412,160
    poolers_and_itm = 2 * (64 + 64) * 64 + 2 * 64 * 2  # 16,640
    heads = 2 * 12 * 64 * (64 + 30522) + 2 * 8 * 64 * (64 + 41)  # every position: 47,087,616
    count = pretraining_flops(config, text_len=12, num_regions=9)
    assert (count.image_embedding, count.encoder, count.poolers_and_itm, count.heads) == (
        79_488,
        4_412_160,
        16_640,
        47_087_616,
    )
    assert count.forward == image_embedding + encoder + poolers_and_itm + heads == 51_595_904
    assert count.training_step == 3 * 51_595_904 - 79_488
    gathered = pretraining_flops(config, 12, 9, msm_positions=3, mrm_positions=1.5)
    assert gathered.heads == 2 * 3 * 64 * (64 + 30522) + round(2 * 1.5 * 64 * (64 + 41))


def _batch(config: BertConfig, size: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    samples = random_pretraining_samples(
        config, size, seed, boxes=(3, 9), caption_tokens=(5, 11), itm_prob=0.3
    )
    return collate_pretraining(samples)


def _counted(model, batch: dict[str, torch.Tensor], backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(**model_inputs(batch))  # the trainer's own renaming
        if backward:
            (out.msm + out.mrm + out.itm).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("gather_heads", [True, False])
def test_count_agrees_with_torch_flop_counter(config: BertConfig, gather_heads: bool) -> None:
    """Matrix-product FLOPs of a real forward and training step of the tiny model, as torch counts
    them: equal (within 0.1%, for the per-sample averaging of the head positions).

    The reference attention math is used: torch's counter does not see the fused CPU attention
    kernel, whose products are the same.
    """
    torch.manual_seed(0)
    model = InterBertForMultiModalPreTraining(config)
    model.gather_heads = gather_heads
    model.set_attention_impl(use_sdpa=False)
    batch = _batch(config)
    ours = batch_flops(config, batch, gather_heads=gather_heads)
    assert ours.heads > 0 and batch["input_ids"].shape[1] % 8 == 0  # bucketed padding, counted as is
    assert _counted(model.eval(), batch, backward=False) == pytest.approx(ours.forward, rel=1e-3)
    assert _counted(model.train(), batch, backward=True) == pytest.approx(ours.training_step, rel=1e-3)


def test_peaks_by_device_and_override() -> None:
    assert peak_flops("bf16", "NVIDIA H200") == 989.4e12
    assert peak_flops("fp16", "NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("fp32", "NVIDIA H100 PCIe") == 51e12
    assert peak_flops("tf32", "NVIDIA A100-SXM4-80GB") == 156e12
    assert peak_flops("bf16", "NVIDIA GeForce RTX 4090") is None
    assert peak_flops("bf16", "anything", override_tflops=100) == 100e12
    with pytest.raises(ValueError, match="int8"):
        peak_flops("int8", "NVIDIA H200")


def test_mfu_in_nanogpt_manner() -> None:
    # 40 GFLOP per sample x 64 samples per step, 17.4 steps/s on a 989.4 TFLOP/s chip: 4.5%.
    assert estimate_mfu(40e9 * 64, 17.4, 989.4e12) == pytest.approx(40e9 * 64 * 17.4 / 989.4e12)
    assert estimate_mfu(1e12, 2.0, 4e12) == 0.5


def test_run_logger_prints_and_records_mfu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from vilbert.run_logging import RunLogger

    log = RunLogger(str(tmp_path), enabled=True, log_every=2, quiet=True, peak_flops=1e15)
    with caplog.at_level(logging.INFO, logger="vilbert.run_logging"):
        for step in (1, 2):
            log.step(step, {"loss": torch.tensor(1.0)}, 1e-4, 64, flops=2.5e12)
        for step in (3, 4):  # the call without FLOPs still works: no MFU then
            log.step(step, {"loss": 0.5}, 1e-4, 64)
    log.close()
    records = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert records[0]["mfu"] == pytest.approx(records[0]["tflops_per_s"] * 1e12 / 1e15)
    assert records[0]["samples_per_s"] > 0 and "mfu" not in records[1]
    assert "MFU" in caplog.records[0].getMessage() and "MFU" not in caplog.records[1].getMessage()


def test_the_rates_count_training_time_only_across_an_epoch_boundary(monkeypatch, tmp_path: Path) -> None:
    """A log interval that spans the end of an epoch: 3 s of steps before it, 10 s of validation, 1 s
    after it. The rates divide by the 4 s of training, not by the 1 s since the epoch began."""
    import json

    from vilbert import run_logging

    clock = iter([0.0, 0.0, 3.0, 3.0, 13.0, 14.0, 14.0])
    monkeypatch.setattr(run_logging.time, "perf_counter", lambda: next(clock))
    log = run_logging.RunLogger(str(tmp_path), enabled=True, log_every=4, quiet=True, peak_flops=1e12)
    log.start_epoch(0, total=3)  # 0.0
    for step in (1, 2, 3):
        log.step(step, {"loss": 1.0}, 1e-4, 64, flops=1e12)
    log.end_epoch()  # 3.0 (and the restart of the clock, 3.0)
    log.start_epoch(1, total=3)  # 13.0: after validation
    log.step(4, {"loss": 1.0}, 1e-4, 64, flops=1e12)  # 14.0: the log line, then the clock's restart
    record = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])
    assert record["samples_per_s"] == pytest.approx(4 * 64 / 4.0)
    assert record["mfu"] == pytest.approx(4e12 / 4.0 / 1e12)
