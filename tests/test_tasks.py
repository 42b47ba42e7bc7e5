"""The task YAML, task selection and the two task forwards (retrieval and VCR) of ``vilbert.tasks``."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from tests.conftest import PUBLISHED_TASK_KEYS, ROOT, task_world
from vilbert.config import BertConfig
from vilbert.modeling import InterBertForVLTasks
from vilbert.tasks import (
    TASKS,
    FeatureStores,
    TaskConfig,
    TaskConfigError,
    load_task_configs,
    retrieval_forward,
    select_tasks,
    vcr_forward,
)
from vilbert.tokenization import BertTokenizer, default_vocab_path

VCR_FILES = {
    "type": "VL-logit",
    "loss": "CrossEntropyLoss",
    "dataroot": "data/VCR",
    "features_h5path1": "data/VCR/VCR_resnet101_faster_rcnn_genome.lmdb",
    "features_h5path2": "data/VCR/VCR_gt_resnet101_faster_rcnn_genome.lmdb",
    "train_annotations_jsonpath": "data/VCR/train.jsonl",
    "val_annotations_jsonpath": "data/VCR/val.jsonl",
    "train_split": "train",
    "val_split": "val",
}
PUBLISHED = {
    "TASK1": {
        **VCR_FILES, "name": "VCR_Q-A", "task_id": 6, "max_seq_length": 60, "max_region_num": 100,
        "batch_size": 32, "lr": 0.00002, "num_epoch": 20,
    },
    "TASK2": {
        **VCR_FILES, "name": "VCR_QA-R", "task_id": 7, "max_seq_length": 80, "max_region_num": 100,
        "batch_size": 32, "lr": 0.00002, "num_epoch": 20,
    },
    "TASK3": {
        "name": "RetrievalFlickr30k", "type": "VL-logit", "loss": "CrossEntropyLoss", "task_id": 9,
        "dataroot": "data/flickr30k",
        "features_h5path1": "data/flickr30k/flickr30k_resnet101_faster_rcnn_genome.lmdb",
        "features_h5path2": "",
        "train_annotations_jsonpath": "data/flickr30k/all_data_final_train_2014.jsonline",
        "val_annotations_jsonpath": "data/flickr30k/all_data_final_val_set0_2014.jsonline",
        "max_seq_length": 30, "max_region_num": 102, "batch_size": 64, "train_split": "train",
        "val_split": "val", "lr": 0.00002, "num_epoch": 30,
    },
}  # fmt: skip
# ``interbert_tasks_eval.yml``: Flickr30K validates on the test split, with its own features.
PUBLISHED_EVAL = {
    **PUBLISHED,
    "TASK3": {
        **PUBLISHED["TASK3"],
        "features_h5path1": "data/flickr30k/flickr30k_test_resnet101_faster_rcnn_genome.lmdb",
        "val_annotations_jsonpath": "data/flickr30k/all_data_final_test_set0_2014.jsonline",
        "val_split": "test",
    },
}


def _write_yaml(path, content: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------------------------------------
# The published YAMLs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [("interbert_tasks.yml", PUBLISHED), ("interbert_tasks_eval.yml", PUBLISHED_EVAL)],
)
def test_published_task_yamls_hold_the_published_values(filename, expected):
    with open(os.path.join(ROOT, filename), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    assert list(raw) == ["TASK1", "TASK2", "TASK3"]
    for key, entry in raw.items():
        assert list(entry) == PUBLISHED_TASK_KEYS, key
        assert entry == expected[key], key
        # Exact types too: a quoted "32" or an int lr would load differently.
        assert {k: type(v) for k, v in entry.items()} == {k: type(v) for k, v in expected[key].items()}, key


def test_published_yaml_loads_with_paths_under_the_repository():
    configs = load_task_configs(os.path.join(ROOT, "interbert_tasks.yml"))
    flickr = configs["TASK3"]
    assert flickr.dataroot == os.path.join(ROOT, "data", "flickr30k")
    assert flickr.features_h5path2 == ""  # empty stays empty, not the YAML folder
    assert [task.name for task in select_tasks(configs, "1-2", "interbert_tasks.yml")] == [
        "VCR_Q-A",
        "VCR_QA-R",
    ]
    assert {task.name for task in configs.values()} <= set(TASKS)


# ---------------------------------------------------------------------------------------------
# Loading and selecting
# ---------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    absolute = str(tmp_path / "elsewhere" / "features.lmdb")
    entry = {**PUBLISHED["TASK3"], "features_h5path2": absolute}
    path = _write_yaml(tmp_path / "configs" / "tasks.yml", {"TASK3": entry})
    monkeypatch.chdir(tmp_path)  # a working directory that is not the YAML's folder
    task = load_task_configs(os.path.relpath(path))["TASK3"]
    folder = tmp_path / "configs"
    assert task.dataroot == str(folder / "data" / "flickr30k")
    assert task.features_h5path1 == str(folder / "data/flickr30k/flickr30k_resnet101_faster_rcnn_genome.lmdb")
    assert task.train_annotations_jsonpath == str(
        folder / "data/flickr30k/all_data_final_train_2014.jsonline"
    )
    assert task.val_annotations_jsonpath == str(
        folder / "data/flickr30k/all_data_final_val_set0_2014.jsonline"
    )
    assert task.features_h5path2 == absolute
    # Everything else is taken as written.
    assert (task.key, task.name, task.task_id, task.batch_size, task.lr) == (
        "TASK3",
        "RetrievalFlickr30k",
        9,
        64,
        0.00002,
    )
    assert task.annotations("train") == task.train_annotations_jsonpath
    assert task.annotations("val") == task.val_annotations_jsonpath


def test_missing_key_names_the_file_the_task_and_the_key(tmp_path):
    entry = {k: v for k, v in PUBLISHED["TASK1"].items() if k not in ("lr", "max_region_num")}
    path = _write_yaml(tmp_path / "tasks.yml", {"TASK1": entry})
    with pytest.raises(TaskConfigError, match=rf"{path}: TASK1 lacks max_region_num, lr"):
        load_task_configs(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", "abc", "TASK1 batch_size: expected a positive whole number, got 'abc'"),
        ("batch_size", 0, "TASK1 batch_size: expected a positive whole number, got 0"),
        ("max_region_num", 0, "TASK1 max_region_num: expected a positive whole number, got 0"),
        ("max_region_num", 1, "TASK1 max_region_num: needs the global region and a box, got 1"),
        ("num_epoch", 2.5, "TASK1 num_epoch: expected a positive whole number, got 2.5"),
        ("max_seq_length", 3, "TASK1 max_seq_length: 3 cannot hold"),
        ("lr", "fast", "TASK1 lr: expected a positive number, got 'fast'"),
        ("lr", 0, "TASK1 lr: expected a positive number, got 0"),
    ],
)
def test_wrong_typed_or_zero_yaml_values_name_the_file_task_and_key(tmp_path, key, value, message):
    path = _write_yaml(tmp_path / "tasks.yml", {"TASK1": {**PUBLISHED["TASK1"], key: value}})
    with pytest.raises(TaskConfigError, match=rf"{path}: {message}"):
        load_task_configs(path)


def test_a_yaml_lr_written_without_a_dot_is_read_as_a_number(tmp_path):
    path = _write_yaml(tmp_path / "tasks.yml", {"TASK1": {**PUBLISHED["TASK1"], "lr": "2e-5"}})
    assert load_task_configs(path)["TASK1"].lr == 2e-5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("TASK1: [1, 2]\n", "TASK1 is not a mapping"),
        ("- TASK1\n", "mapping"),
        ("TASK1: {a: [\n", "invalid YAML"),
    ],
)
def test_malformed_yaml_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "tasks.yml"
    path.write_text(content)
    with pytest.raises(TaskConfigError, match=rf"{path}: .*{message}"):
        load_task_configs(str(path))


def test_missing_yaml_is_an_error(tmp_path):
    with pytest.raises(TaskConfigError, match="task config not found: .*absent.yml"):
        load_task_configs(str(tmp_path / "absent.yml"))


def test_select_tasks_in_the_given_order_and_unknown_numbers_fail(tmp_path):
    path = _write_yaml(tmp_path / "tasks.yml", PUBLISHED)
    configs = load_task_configs(path)
    assert [t.key for t in select_tasks(configs, "3", path)] == ["TASK3"]
    assert [t.key for t in select_tasks(configs, "2-1", path)] == ["TASK2", "TASK1"]
    assert [t.key for t in select_tasks(configs, "1-2-3", path)] == ["TASK1", "TASK2", "TASK3"]
    with pytest.raises(
        TaskConfigError, match=rf"{path}: no TASK4 \(from --tasks 1-4\); it has TASK1, TASK2, TASK3"
    ):
        select_tasks(configs, "1-4", path)
    with pytest.raises(TaskConfigError, match="selects no task"):
        select_tasks(configs, "-", path)


def test_select_tasks_rejects_a_task_name_without_an_implementation(tmp_path):
    path = _write_yaml(tmp_path / "tasks.yml", {"TASK5": {**PUBLISHED["TASK3"], "name": "RefCOCO"}})
    with pytest.raises(
        TaskConfigError, match=r"TASK5 name 'RefCOCO' is not a known task .*RetrievalFlickr30k"
    ):
        select_tasks(load_task_configs(path), "5", path)


# ---------------------------------------------------------------------------------------------
# Forwards, against a model that returns scripted logits
# ---------------------------------------------------------------------------------------------


class ScriptedModel(nn.Module):
    """Returns the given per-option heads and keeps the inputs it was called with."""

    def __init__(self, vil_logit: torch.Tensor | None = None, binary: torch.Tensor | None = None) -> None:
        super().__init__()
        self.vil_logit = vil_logit
        self.binary = binary
        self.inputs: dict[str, torch.Tensor] = {}

    def forward(self, pooled_only: bool = False, **inputs: torch.Tensor) -> SimpleNamespace:
        self.inputs = inputs
        return SimpleNamespace(vil_logit=self.vil_logit, vil_binary_prediction=self.binary)


def _option_batch(batch_size: int, options: int, per_option_image: bool, seed: int = 0) -> dict:
    """Random inputs of the collated datasets' shapes: [B, K, T] text, images per sample or per option."""
    g = torch.Generator().manual_seed(seed)
    t, r, d = 5, 3, 4
    image_shape = (batch_size, options) if per_option_image else (batch_size,)
    return {
        "input_ids": torch.randint(1, 100, (batch_size, options, t), generator=g),
        "segment_ids": torch.randint(0, 2, (batch_size, options, t), generator=g),
        "input_mask": torch.randint(0, 2, (batch_size, options, t), generator=g),
        "image_feat": torch.randn(*image_shape, r, d, generator=g),
        "image_loc": torch.rand(*image_shape, r, 5, generator=g),
        "image_mask": torch.randint(0, 2, (*image_shape, r), generator=g),
        "multimodal_mask": torch.randint(0, 2, (batch_size, options, r + t), generator=g),
    }


def test_retrieval_loss_is_the_two_way_cross_entropy_of_each_candidate():
    batch = _option_batch(3, 4, per_option_image=True)
    batch["itm_labels"] = torch.tensor([[0, 1, 1, 1]] * 3)
    batch["target"] = torch.zeros(3, dtype=torch.long)
    pair_logits = torch.tensor(
        [
            [[3.0, 0.0], [0.5, 0.2], [1.0, 2.0], [-1.0, 1.0]],  # the true pair has the top match logit
            [[0.0, 1.0], [0.1, 0.0], [2.0, 0.0], [0.0, 0.0]],  # candidate 2 wins
            [[1.0, 1.0], [0.0, 3.0], [-2.0, 0.5], [0.9, 0.0]],  # true pair wins narrowly
        ]
    )
    model = ScriptedModel(binary=pair_logits.reshape(12, 2))
    out = retrieval_forward(model, batch)

    # log p(label) of each of the 12 (caption, image) pairs, written out.
    labels = batch["itm_labels"]
    log_norm = torch.log(torch.exp(pair_logits[..., 0]) + torch.exp(pair_logits[..., 1]))
    chosen = torch.where(labels == 0, pair_logits[..., 0], pair_logits[..., 1])
    expected = -(chosen - log_norm).sum() / 12
    torch.testing.assert_close(out.loss, expected)
    assert int(out.correct) == 2 and out.count == 3
    torch.testing.assert_close(out.logits, pair_logits[..., 0])
    # Each candidate keeps its own image: [B, 4, ...] → [B*4, ...] in candidate order.
    torch.testing.assert_close(model.inputs["image_feat"], batch["image_feat"].reshape(12, 3, 4))
    torch.testing.assert_close(model.inputs["input_ids"], batch["input_ids"].reshape(12, 5))
    torch.testing.assert_close(model.inputs["token_type_ids"], batch["segment_ids"].reshape(12, 5))
    torch.testing.assert_close(model.inputs["image_attention_mask"], batch["image_mask"].reshape(12, 3))
    torch.testing.assert_close(model.inputs["multimodal_mask"], batch["multimodal_mask"].reshape(12, 8))


def test_vcr_forward_repeats_the_image_per_option_and_ignores_unlabelled_questions():
    batch = _option_batch(3, 4, per_option_image=False)
    batch["target"] = torch.tensor([2, -1, 0])
    logits = torch.tensor(
        [[0.1, 0.3, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0], [0.0, 1.5, 0.2, 0.1]], requires_grad=True
    )
    model = ScriptedModel(vil_logit=logits.reshape(12, 1))
    out = vcr_forward(model, batch)

    # Cross-entropy over the 4 options of the two labelled questions only.
    expected = -(torch.log_softmax(logits[0], 0)[2] + torch.log_softmax(logits[2], 0)[0]) / 2
    torch.testing.assert_close(out.loss, expected)
    assert int(out.correct) == 1  # question 0 right, question 2 wrong, question 1 not counted
    assert out.count == 3
    image = model.inputs["image_feat"].reshape(3, 4, 3, 4)
    for option in range(4):
        torch.testing.assert_close(image[:, option], batch["image_feat"])
        torch.testing.assert_close(
            model.inputs["image_loc"].reshape(3, 4, 3, 5)[:, option], batch["image_loc"]
        )
        torch.testing.assert_close(
            model.inputs["image_attention_mask"].reshape(3, 4, 3)[:, option], batch["image_mask"]
        )
    torch.testing.assert_close(model.inputs["input_ids"], batch["input_ids"].reshape(12, 5))


def test_vcr_forward_without_labels_has_a_zero_loss_that_still_backpropagates():
    batch = _option_batch(2, 4, per_option_image=False)
    batch["target"] = torch.tensor([-1, -1])
    logits = torch.randn(8, 1, requires_grad=True)
    out = vcr_forward(ScriptedModel(vil_logit=logits), batch)
    assert float(out.loss.detach()) == 0.0 and int(out.correct) == 0 and out.count == 2
    out.loss.backward()  # a step over an unlabelled batch must not break the training loop
    assert logits.grad is not None


# ---------------------------------------------------------------------------------------------
# Both tasks end to end on the synthetic world: dataset → collate → forward with the real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> str:
    return task_world(str(tmp_path_factory.mktemp("tasks") / "world"), 1, flickr=(4, 3, 2), vcr=(4, 3, 2))


@pytest.mark.parametrize("number", ["1", "2", "3"])
def test_real_model_forward_on_synthetic_batches(tiny_world, number):
    task: TaskConfig = select_tasks(load_task_configs(tiny_world), number, tiny_world)[0]
    spec = TASKS[task.name]
    dataset = spec.build(task, task.val_split, BertTokenizer(default_vocab_path()), FeatureStores(), 0)
    batch = spec.collate([dataset[i] for i in range(3)])
    torch.manual_seed(0)
    model = InterBertForVLTasks(
        BertConfig.from_json_file(os.path.join(ROOT, "config", "interbert_tiny.json"))
    )
    model.eval()
    out = spec.forward(model, batch)
    assert out.logits.shape == (3, 4) and out.count == 3
    assert torch.isfinite(out.loss) and 0 <= int(out.correct) <= 3
    # The loss is the cross-entropy of the logits it reports (retrieval: of the pairs' 2-way logits).
    if task.name == "RetrievalFlickr30k":
        assert batch["itm_labels"].tolist() == [[0, 1, 1, 1]] * 3
    else:
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, batch["target"]))
