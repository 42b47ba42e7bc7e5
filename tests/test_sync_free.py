"""No host round trip inside a training step (issue: throughput), checked on the CPU.

A GPU step that reads a tensor's value on the host (``.item()``, ``bool(t)``, a boolean-mask index,
``nonzero``) waits for the device and stalls the launch queue. On the CPU such reads cost nothing,
so this test watches for them at the dispatcher: every operation of the published pretraining and
fine-tuning steps (the trainers' own ``train_step`` and ``task_iteration``, BertAdam, the EMA and
the non-finite guard) runs under a mode that records the ones that would synchronise a GPU. The
same steps run on CUDA under ``torch.cuda.set_sync_debug_mode("error")`` in ``test_cuda.py``.
A control shows the spy does catch a sync: the mask-gathered heads without the collate's positions.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests import test_fast_paths as fast_paths
from vilbert.config import BertConfig
from vilbert.ema import ExponentialMovingAverage
from vilbert.engine import Optimization
from vilbert.finetuning import TaskModel, task_iteration
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.precision import Precision
from vilbert.pretraining import to_device, train_step
from vilbert.recipe import finetuning_plan, pretraining_plan
from vilbert.training_state import NonFiniteGuard

samples = fast_paths.samples  # the fixture: masked samples of varied lengths

# Operations whose result the host must read (or whose output size depends on values).
SYNCING = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.repeat_interleave.Tensor",
}
CPU = torch.device("cpu")
MASK_INDEXING = {"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"}


class HostReads(TorchDispatchMode):
    """Records every operation of the block that would make a GPU wait for the host."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNCING or (name in MASK_INDEXING and _has_mask_index(args)):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _engine(model: torch.nn.Module, plan, device: torch.device) -> Optimization:
    ema = ExponentialMovingAverage(model, 0.9)
    scaler = Precision("fp32", device).make_scaler()
    guard = NonFiniteGuard(3)
    return Optimization(model, plan.optimizer, plan.scheduler, scaler, guard, plan.max_grad_norm, ema)


def pretraining_steps(
    micro_batches, device: torch.device, spy=None, positions: bool = True, recipe: str = "published"
) -> Optimization:
    """Two optimiser steps of two micro-batches each, every fast path on."""
    torch.manual_seed(0)
    model = InterBertForMultiModalPreTraining(fast_paths.tiny_config())
    model = fast_paths.configured(model, fast_paths.FAST).to(device).train()
    plan = pretraining_plan(recipe, model, 1e-3, 0.1, 4, from_pretrained=False)
    step = _engine(model, plan, device)
    batches = [fast_paths.collate(s, fast_paths.FAST) for s in micro_batches * 2]
    if not positions:
        batches = [{k: v for k, v in b.items() if not k.endswith("_positions")} for b in batches]
    batches = [to_device(b, device) for b in batches]
    with spy or contextlib.nullcontext():
        for index, batch in enumerate(batches):
            will_step = index % 2 == 1
            train_step(step, model, batch, fast_paths.LOSS_ARGS, Precision("fp32", device), 2, will_step)
    return step


@dataclass
class ScriptedTask:
    """What ``task_iteration`` needs of a task: its name, loss scale and next batch."""

    name: str
    loss_scale: float
    batch: dict[str, Any]

    def next_batch(self) -> dict[str, Any]:
        return self.batch


def _task_batch(per_option_image: bool, batch_size: int = 3, options: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    t, r = 6, 5
    images = (batch_size, options) if per_option_image else (batch_size,)
    text_mask = torch.ones(batch_size, options, t, dtype=torch.long)
    image_mask = torch.ones(*images, r, dtype=torch.long)
    shared = image_mask if per_option_image else image_mask.unsqueeze(1).expand(-1, options, -1)
    return {
        "input_ids": torch.randint(1, 100, (batch_size, options, t), generator=g),
        "segment_ids": torch.zeros(batch_size, options, t, dtype=torch.long),
        "input_mask": text_mask,
        "image_feat": torch.randn(*images, r, fast_paths.FEAT, generator=g),
        "image_loc": torch.rand(*images, r, 5, generator=g),
        "image_mask": image_mask,
        "multimodal_mask": torch.cat([shared, text_mask], dim=-1),
    }


def finetuning_steps(device: torch.device, spy=None) -> Optimization:
    """Two published iterations over VCR and retrieval: one optimiser step per task each."""
    torch.manual_seed(0)
    config: BertConfig = fast_paths.tiny_config()
    model = InterBertForVLTasks(config, num_labels=1).to(device).train()
    model.set_attention_impl(use_sdpa=True)
    plan = finetuning_plan("published", model, 2e-5, 0.1, 4, "mannul")
    step = _engine(TaskModel(model), plan, device)
    vcr = {**_task_batch(per_option_image=False), "target": torch.tensor([2, 0, 1])}
    retrieval = {
        **_task_batch(per_option_image=True),
        "itm_labels": torch.tensor([[0, 1, 1, 1]] * 3),
        "target": torch.zeros(3, dtype=torch.long),
    }
    if device.type == "cuda":  # as the DataLoader hands them over: pinned, so the copy is asynchronous
        vcr, retrieval = ({k: v.pin_memory() for k, v in b.items()} for b in (vcr, retrieval))
    tasks = [
        ScriptedTask("VCR_Q-A", 1.0, vcr),
        ScriptedTask("RetrievalFlickr30k", 1.0, retrieval),
    ]
    with spy or contextlib.nullcontext():
        for _ in range(2):
            task_iteration(step, step.model, tasks, Precision("fp32", device), device, 1, True, True)
    return step


@pytest.mark.parametrize("recipe", ["published", "modern"])
def test_the_pretraining_step_reads_nothing_on_the_host(samples, recipe):
    """Published: BertAdam; modern: fused AdamW, the global clip and the LambdaLR schedule."""
    spy = HostReads()
    step = pretraining_steps(samples, CPU, spy, recipe=recipe)
    if recipe == "modern":
        assert step.optimizer.defaults["fused"]
    assert spy.found == []
    step.settle()  # the host's look, outside the step: nothing was skipped
    assert step.guard.skipped_steps == 0


def test_the_published_fine_tuning_iteration_reads_nothing_on_the_host():
    spy = HostReads()
    step = finetuning_steps(CPU, spy)
    assert spy.found == []
    step.settle()
    assert step.guard.skipped_steps == 0


def test_the_spy_sees_a_mask_gather(samples):
    """The control: the gathered heads without the collate's positions index by a boolean mask."""
    spy = HostReads()
    pretraining_steps(samples[:1], CPU, spy, positions=False)
    assert "aten.index.Tensor" in spy.found


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_later(samples):
    """A NaN loss: the weights and the EMA stay, the host learns of it only when it settles."""
    step = pretraining_steps(samples[:1], CPU)
    weights = copy.deepcopy(step.model.state_dict())
    shadow = [t.clone() for t in step.ema.shadow.values()]
    batch = fast_paths.collate(samples[0], fast_paths.FAST)
    batch["image_feat"] = torch.full_like(batch["image_feat"], float("nan"))
    spy = HostReads()
    with spy:
        train_step(step, step.model, batch, fast_paths.LOSS_ARGS, Precision("fp32", CPU), 1, True)
    assert spy.found == [] and step.guard.skipped_steps == 0
    assert all(torch.equal(v, weights[k]) for k, v in step.model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(shadow, step.ema.shadow.values()))
    step.settle()
    assert (step.guard.skipped_steps, step.guard.bad_steps) == (1, 1)
