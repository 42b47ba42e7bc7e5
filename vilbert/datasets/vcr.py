"""VCR multiple choice (docs/data.md §4): Q→A (``VCR_Q-A``) and QA→R (``VCR_QA-R``), four options per sample.

Texts mix words and references to detected objects (``[0, 2]``); a reference becomes the object's
class name, except ``person``, which becomes a gender-neutral first name drawn once per question
(seeded by (seed, question row)), so the same person keeps the same name across the question, its
answers and its rationales, and a run is reproducible. Regions merge the ground-truth boxes of the
annotation with the detector's boxes.

On the test split QA→R has no correct answer to condition on, so each question yields four samples,
one per answer (``answer_index``), each scoring that answer's four rationales: the 16 rationale
probabilities of the leaderboard file.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vilbert.datasets.features import RegionFeatures, RegionFeatureStore, check_images_present
from vilbert.datasets.jsonl import AnnotationError, read_jsonl_records
from vilbert.datasets.loader import trim_padding
from vilbert.datasets.rules import DataRules, check_rules
from vilbert.datasets.validation import build_skipping_bad
from vilbert.errors import BadInputError
from vilbert.tokenization import BertTokenizer

logger = logging.getLogger(__name__)

VCR_TASKS = ("VCR_Q-A", "VCR_QA-R")
NUM_OPTIONS = 4
PERSON = "person"
_SPLIT_ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}

Tokens = list[str | list[int]]  # a VCR text: words, and references (indices into ``objects``)


def vcr_image_id(img_id: str) -> int:
    """``train-N`` → N, ``val-N`` → N + 1,000,000, ``test-N`` → N + 2,000,000 (the feature LMDB keys)."""
    split, _, number = str(img_id).partition("-")
    if split not in _SPLIT_ID_OFFSET or not number.isdigit():
        raise BadInputError(f"VCR image id {img_id!r} is not of the form train-N, val-N or test-N")
    return int(number) + _SPLIT_ID_OFFSET[split]


def load_unisex_names(csv_path: str) -> list[str]:
    """First names from the ``name`` column of ``unisex_names_table.csv`` (FiveThirtyEight's table)."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"names table not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            raise BadInputError(f"{csv_path}: no 'name' column in the header {reader.fieldnames}")
        names = [row["name"].strip() for row in reader if row.get("name") and row["name"].strip()]
    if not names:
        raise BadInputError(f"{csv_path}: no names")
    return names


@dataclass(frozen=True)
class VCRExample:
    """One annotation line; labels are ``None`` on the test split."""

    annot_id: str
    image_id: int
    question: Tokens
    answers: list[Tokens]
    rationales: list[Tokens]
    objects: list[str]
    answer_label: int | None
    rationale_label: int | None


def _text_problem(text: Any, num_objects: int) -> str | None:
    if not isinstance(text, list):
        return "is not a list"
    for item in text:
        if isinstance(item, str):
            continue
        if not isinstance(item, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in item
        ):
            return f"holds {item!r}, neither a word nor a list of object indices"
        if any(not 0 <= i < num_objects for i in item):
            return f"refers to object {item} but the annotation has {num_objects} objects"
    return None


def _label_problem(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < NUM_OPTIONS:
        return f"missing or invalid {key!r} ({value!r}); expected 0..{NUM_OPTIONS - 1}"
    return None


def _parse_example(record: dict[str, Any], labels: Sequence[str]) -> VCRExample | str:
    """The example of one line, or a string saying what is wrong with it."""
    for key in ("question", "answer_choices", "rationale_choices", "objects", "img_id", "annot_id"):
        if key not in record:
            return f"missing field {key!r}"
    objects = record["objects"]
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        return "field 'objects' must be a list of class names"
    problem = _text_problem(record["question"], len(objects))
    if problem:
        return f"field 'question' {problem}"
    for key in ("answer_choices", "rationale_choices"):
        choices = record[key]
        if not isinstance(choices, list) or len(choices) != NUM_OPTIONS:
            return f"field {key!r} must hold {NUM_OPTIONS} choices"
        for i, choice in enumerate(choices):
            problem = _text_problem(choice, len(objects))
            if problem:
                return f"field {key!r}[{i}] {problem}"
    for key in labels:
        problem = _label_problem(record, key)
        if problem:
            return problem
    try:
        image_id = vcr_image_id(record["img_id"])
    except ValueError as err:
        return str(err)
    return VCRExample(
        annot_id=str(record["annot_id"]),
        image_id=image_id,
        question=record["question"],
        answers=record["answer_choices"],
        rationales=record["rationale_choices"],
        objects=objects,
        answer_label=record.get("answer_label") if "answer_label" in labels else None,
        rationale_label=record.get("rationale_label") if "rationale_label" in labels else None,
    )


def load_vcr_annotations(path: str, task: str, labelled: bool) -> list[VCRExample]:
    """All lines of a VCR ``.jsonl``; ``labelled`` requires the labels the task needs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VCR annotations not found: {path}")
    labels: tuple[str, ...] = ()
    if labelled:
        labels = ("answer_label",) if task == "VCR_Q-A" else ("answer_label", "rationale_label")
    examples = []
    for lineno, record in read_jsonl_records(path):
        example = _parse_example(record, labels)
        if isinstance(example, str):
            raise AnnotationError(f"{path}:{lineno}: {example}")
        examples.append(example)
    if not examples:
        raise AnnotationError(f"{path}: no annotations")
    return examples


def truncate_pair(tokens_a: list[int], tokens_b: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Drop tokens from the end of the longer text (text B on ties) until both fit, as published."""
    excess = len(tokens_a) + len(tokens_b) - max_length
    if excess <= 0:
        return tokens_a, tokens_b
    len_a, len_b = len(tokens_a), len(tokens_b)
    for _ in range(excess):
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    return tokens_a[:len_a], tokens_b[:len_b]


def merge_regions(
    detected: RegionFeatures, ground_truth: RegionFeatures, max_region_num: int
) -> dict[str, np.ndarray]:
    """Detected regions (global first), then the ground-truth boxes, zero-padded to ``max_region_num``.

    The published order: up to ``max_region_num - 1`` ground-truth boxes (without their global row)
    are kept, and detected regions fill what is left in front of them. Row 0 is the box-count-weighted
    mean of the two global features, the counts including each file's global row (``num_boxes``).
    Returns ``image_feat`` [R, D] float32, ``image_loc`` [R, 5] float32, ``image_mask`` [R] int64.
    """
    width = detected.features.shape[1]
    if ground_truth.features.shape[1] != width:
        raise BadInputError(
            f"feature widths differ: detected {width}, ground truth {ground_truth.features.shape[1]}"
        )
    gt_kept = min(max_region_num - 1, ground_truth.num_boxes - 1)
    det_kept = min(max_region_num - gt_kept, detected.num_boxes)
    total = det_kept + gt_kept
    image_feat = np.zeros((max_region_num, width), dtype=np.float32)
    image_loc = np.zeros((max_region_num, 5), dtype=np.float32)
    image_mask = np.zeros(max_region_num, dtype=np.int64)
    image_feat[:det_kept] = detected.features[:det_kept]
    image_feat[det_kept:total] = ground_truth.features[1 : 1 + gt_kept]
    image_loc[:det_kept] = detected.boxes[:det_kept]
    image_loc[det_kept:total] = ground_truth.boxes[1 : 1 + gt_kept]
    image_mask[:total] = 1
    weights = detected.num_boxes + ground_truth.num_boxes
    image_feat[0] = (
        detected.features[0] * detected.num_boxes + ground_truth.features[0] * ground_truth.num_boxes
    ) / weights
    return {"image_feat": image_feat, "image_loc": image_loc, "image_mask": image_mask}


class VCRDataset(Dataset):
    """Four (text, image) options per sample, scored with ``vil_logit``.

    Sample (numpy): ``input_ids``, ``input_mask``, ``segment_ids`` [4, T] int64; ``image_feat`` [R, D]
    float32, ``image_loc`` [R, 5] float32 and ``image_mask`` [R] int64, once per question (the task
    forward expands them over the options); ``multimodal_mask`` [4, R+T] int64 (image first);
    ``target`` int64 (correct option, -1 on the test split); ``annot_id`` str; ``question_index``
    int64 (row of the annotation file); ``answer_index`` int64 (QA→R: the answer conditioning the
    rationales; -1 for Q→A); ``image_id`` int64 (mapped as in :func:`vcr_image_id`).

    When a feature store skips a damaged image (``on_bad_record="skip"``), a labelled sample that
    would read it is replaced by the next one; on the test split every question must be scored, so
    the skipped record stays an error there.
    """

    def __init__(
        self,
        task: str,
        annotations_jsonpath: str,
        features_gt: RegionFeatureStore,
        features_det: RegionFeatureStore,
        tokenizer: BertTokenizer,
        names_csv_path: str,
        max_seq_length: int = 60,
        max_region_num: int = 100,
        split: str = "train",
        seed: int = 0,
        rules: DataRules = "modern",
    ) -> None:
        if task not in VCR_TASKS:
            raise BadInputError(f"unknown VCR task {task!r}; expected one of {VCR_TASKS}")
        if max_seq_length < 4:
            raise BadInputError(
                f"max_seq_length must leave room for [CLS], 2 × [SEP] and text: {max_seq_length}"
            )
        if max_region_num < 2:
            raise BadInputError(f"max_region_num must hold the global region and a box: {max_region_num}")
        self.task = task
        self.split = split
        self.labelled = split != "test"
        self.annotations_path = annotations_jsonpath
        self.examples = load_vcr_annotations(annotations_jsonpath, task, self.labelled)
        image_ids = sorted({example.image_id for example in self.examples})
        check_images_present(image_ids, features_det, annotations_jsonpath)
        check_images_present(image_ids, features_gt, annotations_jsonpath)
        self.features_gt = features_gt
        self.features_det = features_det
        self.tokenizer = tokenizer
        self.names = load_unisex_names(names_csv_path)
        self.max_seq_length = max_seq_length
        self.max_region_num = max_region_num
        self.seed = seed
        self.rules = check_rules(rules)
        self._word_ids: dict[str, list[int]] = {}

        num_questions = len(self.examples)
        if task == "VCR_QA-R" and not self.labelled:
            self._item_question = np.repeat(np.arange(num_questions), NUM_OPTIONS)
            self._item_answer = np.tile(np.arange(NUM_OPTIONS), num_questions)
        else:
            self._item_question = np.arange(num_questions)
            if task == "VCR_QA-R":
                self._item_answer = np.array([e.answer_label for e in self.examples], dtype=np.int64)
            else:
                self._item_answer = np.full(num_questions, -1, dtype=np.int64)
        logger.info("%s %s: %d questions, %d samples", task, split, num_questions, len(self._item_question))

    @property
    def annot_ids(self) -> list[str]:
        return [example.annot_id for example in self.examples]

    def __len__(self) -> int:
        return len(self._item_question)

    def object_names(self, question_index: int) -> list[str]:
        """What each object reference of question ``question_index`` reads as (fixed for a given seed)."""
        objects = self.examples[question_index].objects
        persons = [i for i, name in enumerate(objects) if name == PERSON]
        names = list(objects)
        if persons:
            rng = np.random.default_rng((self.seed, question_index))
            # Published: each person's name drawn on its own (names may repeat); else distinct.
            repeat = self.rules == "published" or len(persons) > len(self.names)
            drawn = rng.choice(len(self.names), size=len(persons), replace=repeat)
            for person, name in zip(persons, drawn):
                names[person] = self.names[name]
        return names

    def _word(self, word: str) -> list[int]:
        ids = self._word_ids.get(word)
        if ids is None:
            ids = self._word_ids[word] = self.tokenizer.encode(word)
        return ids

    def _encode(self, text: Tokens, names: list[str]) -> list[int]:
        """Word by word, as published; a reference to several objects reads as their names in a row."""
        ids: list[int] = []
        for item in text:
            if isinstance(item, str):
                ids.extend(self._word(item))
            else:
                for ref in item:
                    ids.extend(self._word(names[ref]))
        return ids

    def _pair(self, text_a: list[int], text_b: list[int]) -> tuple[list[int], list[int], list[int]]:
        """``[CLS] a [SEP] b [SEP]`` truncated to fit: ids, segment ids, and the truncated ``a``."""
        text_a, text_b = truncate_pair(text_a, text_b, self.max_seq_length - 3)
        tok = self.tokenizer
        ids = [tok.cls_token_id, *text_a, tok.sep_token_id, *text_b, tok.sep_token_id]
        return ids, [0] * (len(text_a) + 2) + [1] * (len(text_b) + 1), text_a

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.labelled:
            return self._sample(index)
        return build_skipping_bad(index, len(self), self._sample, self.annotations_path)

    def _sample(self, index: int) -> dict[str, Any]:
        question_index = int(self._item_question[index])
        answer_index = int(self._item_answer[index])
        example = self.examples[question_index]
        names = self.object_names(question_index)
        text_a = self._encode(example.question, names)
        if self.task == "VCR_Q-A":
            options = example.answers
            target = example.answer_label
        else:
            text_a = [
                *text_a,
                self.tokenizer.sep_token_id,
                *self._encode(example.answers[answer_index], names),
            ]
            options = example.rationales
            target = example.rationale_label

        input_ids = np.full((NUM_OPTIONS, self.max_seq_length), self.tokenizer.pad_token_id, dtype=np.int64)
        segment_ids = np.zeros((NUM_OPTIONS, self.max_seq_length), dtype=np.int64)
        input_mask = np.zeros((NUM_OPTIONS, self.max_seq_length), dtype=np.int64)
        for row, option in enumerate(options):
            ids, segments, truncated_a = self._pair(text_a, self._encode(option, names))
            if self.rules == "published":  # the shared question stays truncated for later options
                text_a = truncated_a
            input_ids[row, : len(ids)] = ids
            segment_ids[row, : len(ids)] = segments
            input_mask[row, : len(ids)] = 1

        sample: dict[str, Any] = merge_regions(
            self.features_det[example.image_id], self.features_gt[example.image_id], self.max_region_num
        )
        image_mask = np.broadcast_to(sample["image_mask"], (NUM_OPTIONS, self.max_region_num))
        sample.update(
            input_ids=input_ids,
            input_mask=input_mask,
            segment_ids=segment_ids,
            multimodal_mask=np.concatenate([image_mask, input_mask], axis=1),
            target=np.int64(-1 if target is None else target),
            annot_id=example.annot_id,
            question_index=np.int64(question_index),
            answer_index=np.int64(answer_index),
            image_id=np.int64(example.image_id),
        )
        return sample


def collate_vcr(samples: Sequence[dict[str, Any]], pad_to_multiple: int | None = None) -> dict[str, Any]:
    """Stack arrays along a new batch axis ([B, 4, T], [B, R, D], ...); ``annot_id`` stays a list of str.

    With ``pad_to_multiple``, the batch is cut to its longest option and region list rounded up to
    that many positions (:func:`~vilbert.datasets.loader.trim_padding`); by default it keeps the
    fixed padding.
    """
    batch: dict[str, Any] = {}
    for key, value in samples[0].items():
        batch[key] = (
            [s[key] for s in samples] if isinstance(value, str) else np.stack([s[key] for s in samples])
        )
    if pad_to_multiple is not None:
        batch = trim_padding(batch, pad_to_multiple)
    return {
        key: value if isinstance(value, list) else torch.from_numpy(value) for key, value in batch.items()
    }
