"""Fine-tuning tasks: the task YAML, and a registry from task name to datasets, loss and score.

Adding a task is one :class:`TaskSpec` entry in ``TASKS``, keyed by the YAML ``name``.

Relative paths in the YAML resolve against the **YAML file's folder** (so the published
``interbert_tasks.yml`` at the repository root finds ``data/VCR/...`` from any working directory).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset

from vilbert.datasets.features import RegionFeatureStore
from vilbert.datasets.retrieval import RetrievalTrainDataset, collate_retrieval
from vilbert.datasets.rules import DataRules
from vilbert.datasets.validation import BadRecordPolicy
from vilbert.datasets.vcr import VCRDataset, collate_vcr
from vilbert.errors import BadInputError
from vilbert.tokenization import BertTokenizer

PATH_KEYS = (
    "dataroot",
    "features_h5path1",
    "features_h5path2",
    "train_annotations_jsonpath",
    "val_annotations_jsonpath",
)
HARD_NEGATIVES = "hard_negative.pkl"
NAMES_TABLE = "unisex_names_table.csv"


class TaskConfigError(BadInputError):
    """A task YAML that is missing, malformed, or lacks a requested task or key."""


@dataclass
class TaskConfig:
    """One ``TASKn`` entry of the task YAML (published keys)."""

    key: str
    name: str
    type: str
    loss: str
    task_id: int
    dataroot: str
    features_h5path1: str
    features_h5path2: str
    train_annotations_jsonpath: str
    val_annotations_jsonpath: str
    max_seq_length: int
    max_region_num: int
    batch_size: int
    train_split: str
    val_split: str
    lr: float
    num_epoch: int

    def annotations(self, split: str) -> str:
        """The annotation file of ``split``: the YAML's train file for its train split, else its val file."""
        return self.train_annotations_jsonpath if split == self.train_split else self.val_annotations_jsonpath


def _resolve(path: str, base: str) -> str:
    return path if not path or os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def per_process_batch(task: TaskConfig, accumulation: int, world_size: int) -> int:
    """YAML batch / accumulation / world size, which must divide exactly."""
    if task.batch_size % (accumulation * world_size):
        raise BadInputError(
            f"{task.key} batch_size {task.batch_size} is not divisible by gradient_accumulation_steps "
            f"{accumulation} x world size {world_size}"
        )
    return task.batch_size // (accumulation * world_size)


def load_task_configs(path: str) -> dict[str, TaskConfig]:
    """Every ``TASKn`` entry of a task YAML, paths resolved against the YAML's folder."""
    if not os.path.isfile(path):
        raise TaskConfigError(f"task config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise TaskConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise TaskConfigError(f"{path}: expected a mapping of TASKn entries")
    base = os.path.dirname(os.path.abspath(path))
    fields = [f.name for f in dataclasses.fields(TaskConfig) if f.name != "key"]
    configs = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise TaskConfigError(f"{path}: {key} is not a mapping")
        missing = [name for name in fields if name not in entry]
        if missing:
            raise TaskConfigError(f"{path}: {key} lacks {', '.join(missing)}")
        values = {name: entry[name] for name in fields}
        for name in PATH_KEYS:
            values[name] = _resolve(str(values[name] or ""), base)
        _check_numbers(values, f"{path}: {key}")
        configs[str(key)] = TaskConfig(key=str(key), **values)
    return configs


# The YAML's numbers and their lower bounds (a batch of 0 or a region count of 0 cannot train).
POSITIVE_INTS = ("max_seq_length", "max_region_num", "batch_size", "num_epoch", "task_id")
MIN_SEQ_LENGTH = 4  # [CLS], two [SEP] and a token (VCR's pairs); retrieval needs 2


def _check_numbers(values: dict[str, Any], where: str) -> None:
    """Type and range of every number of a task entry, naming the YAML file, the task and the key."""
    for name in POSITIVE_INTS:
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TaskConfigError(f"{where} {name}: expected a positive whole number, got {value!r}")
    if values["max_seq_length"] < MIN_SEQ_LENGTH:
        raise TaskConfigError(
            f"{where} max_seq_length: {values['max_seq_length']} cannot hold [CLS] text [SEP]"
        )
    if values["max_region_num"] < 2:
        raise TaskConfigError(
            f"{where} max_region_num: needs the global region and a box, got {values['max_region_num']}"
        )
    lr = values["lr"]
    if isinstance(lr, str):  # YAML 1.1 reads 2e-5 (no dot) as text
        try:
            lr = float(lr)
        except ValueError:
            pass
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise TaskConfigError(f"{where} lr: expected a positive number, got {values['lr']!r}")
    values["lr"] = float(lr)


def select_tasks(configs: dict[str, TaskConfig], tasks: str, source: str) -> list[TaskConfig]:
    """``--tasks 1-2`` → [TASK1, TASK2]; unknown numbers and task names without a spec are errors."""
    selected = []
    for number in filter(None, tasks.split("-")):
        key = f"TASK{number}"
        if key not in configs:
            raise TaskConfigError(f"{source}: no {key} (from --tasks {tasks}); it has {', '.join(configs)}")
        if configs[key].name not in TASKS:
            raise TaskConfigError(
                f"{source}: {key} name {configs[key].name!r} is not a known task ({', '.join(TASKS)})"
            )
        selected.append(configs[key])
    if not selected:
        raise TaskConfigError(f"--tasks {tasks!r} selects no task (use e.g. --tasks 3 or --tasks 1-2)")
    return selected


@dataclass
class TaskOutput:
    """Loss (mean over the batch), number of correct predictions, batch size, per-option logits."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: int
    logits: torch.Tensor


class FeatureStores:
    """Opens each feature LMDB once, however many tasks share it."""

    def __init__(self, in_memory: bool = False, on_bad_record: BadRecordPolicy = "error") -> None:
        self.in_memory = in_memory
        self.on_bad_record = on_bad_record
        self._stores: dict[str, RegionFeatureStore] = {}

    def __call__(self, path: str) -> RegionFeatureStore:
        if path not in self._stores:
            self._stores[path] = RegionFeatureStore(
                path, in_memory=self.in_memory, on_bad_record=self.on_bad_record
            )
        return self._stores[path]


def _flatten_options(batch: dict[str, Any], shared_image: bool) -> dict[str, torch.Tensor]:
    """[B, K, ...] option tensors → [B*K, ...] model inputs; a per-question image is repeated K times."""
    options = batch["input_ids"].shape[1]

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[2:])

    def image(x: torch.Tensor) -> torch.Tensor:
        return flat(x.unsqueeze(1).expand(-1, options, *x.shape[1:])) if shared_image else flat(x)

    return dict(
        input_ids=flat(batch["input_ids"]),
        token_type_ids=flat(batch["segment_ids"]),
        attention_mask=flat(batch["input_mask"]),
        image_feat=image(batch["image_feat"]),
        image_loc=image(batch["image_loc"]),
        image_attention_mask=image(batch["image_mask"]),
        multimodal_mask=flat(batch["multimodal_mask"]),
    )


def vcr_forward(model: nn.Module, batch: dict[str, Any]) -> TaskOutput:
    """Each of the 4 options scored with ``vil_logit``; cross-entropy over the options."""
    out = model(**_flatten_options(batch, shared_image=True), pooled_only=True)
    logits = out.vil_logit.float().view(batch["input_ids"].shape[0], -1)
    target = batch["target"]
    labelled = target >= 0
    # The mean over labelled questions, written so that no host sync decides anything: an unlabelled
    # (test) batch gives 0 and zero gradients, not the NaN of an empty mean.
    total = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")
    loss = total / labelled.sum().clamp(min=1)
    correct = ((logits.argmax(1) == target) & labelled).sum()
    return TaskOutput(loss, correct, int(target.shape[0]), logits)


def retrieval_forward(model: nn.Module, batch: dict[str, Any]) -> TaskOutput:
    """The ITM head on 4 candidates (true pair first): 2-way cross-entropy per candidate;
    correct when the true pair has the highest match logit."""
    out = model(**_flatten_options(batch, shared_image=False), pooled_only=True)
    batch_size = batch["input_ids"].shape[0]
    pair_logits = out.vil_binary_prediction.float().view(batch_size, -1, 2)
    loss = F.cross_entropy(pair_logits.reshape(-1, 2), batch["itm_labels"].reshape(-1))
    correct = (pair_logits[:, :, 0].argmax(1) == batch["target"]).sum()
    return TaskOutput(loss, correct, batch_size, pair_logits[:, :, 0])


def _vcr_dataset(
    task: TaskConfig,
    split: str,
    tokenizer: BertTokenizer,
    stores: FeatureStores,
    seed: int,
    rules: DataRules = "modern",
    annotations: str | None = None,
):
    return VCRDataset(
        task.name,
        annotations or task.annotations(split),
        features_gt=stores(task.features_h5path2),
        features_det=stores(task.features_h5path1),
        tokenizer=tokenizer,
        names_csv_path=os.path.join(task.dataroot, NAMES_TABLE),
        max_seq_length=task.max_seq_length,
        max_region_num=task.max_region_num,
        split=split,
        seed=seed,
        rules=rules,
    )


def _retrieval_dataset(
    task: TaskConfig,
    split: str,
    tokenizer: BertTokenizer,
    stores: FeatureStores,
    seed: int,
    rules: DataRules = "modern",
    annotations: str | None = None,
):
    hard_negatives = os.path.join(task.dataroot, HARD_NEGATIVES)
    return RetrievalTrainDataset(
        annotations or task.annotations(split),
        stores(task.features_h5path1),
        tokenizer,
        hard_negatives if split == task.train_split and os.path.isfile(hard_negatives) else None,
        max_seq_length=task.max_seq_length,
        max_region_num=task.max_region_num,
        split="train" if split == task.train_split else split,
        seed=seed,
        cache_dir=task.dataroot if os.access(task.dataroot, os.W_OK) else None,
        rules=rules,
    )


@dataclass(frozen=True)
class TaskSpec:
    """How to build a task's dataset for a split, collate it, and run the model on it.

    ``build(task, split, tokenizer, stores, seed, rules="modern", annotations=None)``: ``rules`` as
    ``datasets/rules.py`` states them (the scripts pass ``--recipe``); ``annotations`` overrides the
    split's annotation file (evaluation reads splits the YAML does not name)."""

    build: Callable[..., Dataset]
    collate: Callable[[list], dict[str, Any]]
    forward: Callable[[nn.Module, dict[str, Any]], TaskOutput]


TASKS: dict[str, TaskSpec] = {
    "VCR_Q-A": TaskSpec(_vcr_dataset, collate_vcr, vcr_forward),
    "VCR_QA-R": TaskSpec(_vcr_dataset, collate_vcr, vcr_forward),
    "RetrievalFlickr30k": TaskSpec(_retrieval_dataset, collate_retrieval, retrieval_forward),
}


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device``; other entries (annotation ids) stay as they are."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }
