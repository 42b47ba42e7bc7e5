"""Checks of a data set against a task YAML, a model config and a run's batch sizes, without training.

Missing or mismatched data files usually surface hours into a run (an image id absent from the
feature LMDB mid-epoch, features from another detector as a shape error in the first layer, a
hard-negative pool built for another split). Each check here reads the files through the project's
own readers and reports every problem as one line naming the file and the key, so one pass lists
everything to fix. Reading region contents costs a decode per image, so those checks look at an
evenly spread sample of ``sample_images`` images per file; id lists are checked in full.

:func:`require_task_data` and :func:`require_pretraining_data` are the cheap form for a training
script's start-up: a small sample, and one raised error when anything is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vilbert.config import BertConfig
from vilbert.datasets.concept_cap import load_caption_json, pretraining_files
from vilbert.datasets.features import MissingImageError, PretrainingLMDB, RegionFeatures, RegionFeatureStore
from vilbert.datasets.retrieval import load_hard_negative_pool, load_retrieval_annotations
from vilbert.datasets.validation import region_record_problem
from vilbert.datasets.vcr import VCR_TASKS, VCRExample, load_vcr_annotations
from vilbert.errors import BadInputError
from vilbert.tasks import (
    HARD_NEGATIVES,
    NAMES_TABLE,
    TaskConfig,
    load_task_configs,
    per_process_batch,
    select_tasks,
)

# What reading a damaged or missing data file raises (the readers' own one-line errors).
DATA_ERRORS = (OSError, ValueError, MissingImageError)
PREVIEW = 5
STARTUP_SAMPLE = 8
# Boxes no larger than this in an image this many pixels wide were stored normalised, not in pixels.
NORMALISED_EXTENT, LARGE_IMAGE = 1.5, 16


class DataProblemError(BadInputError):
    """The data checks found problems; the message is the first one and how many there are."""


@dataclass
class CheckResult:
    """One row of the report: what was checked, over how many items, and what is wrong."""

    what: str
    count: int | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    note: str = ""
    skipped: bool = False

    @property
    def status(self) -> str:
        if self.problems:
            return "problem"
        return "skipped" if self.skipped else "warning" if self.warnings else "ok"


@dataclass(frozen=True)
class RunShape:
    """The parts of a run that the data must fit: the model, the processes, the sample size."""

    model_config: BertConfig
    config_source: str = "--config_file"
    world_size: int = 1
    gradient_accumulation_steps: int = 1
    sample_images: int = STARTUP_SAMPLE


@dataclass(frozen=True)
class PretrainingData:
    """The pretraining flags the data is checked against (those of ``train_concap.py``)."""

    train_data_dir: str
    val_data_dir: str
    train_batch_size: int = 512
    region_len: int = 36
    predict_feature: bool = False


def preview(items: Sequence[object]) -> str:
    shown = ", ".join(str(item) for item in items[:PREVIEW])
    return shown + (", ..." if len(items) > PREVIEW else "")


def spread_sample(items: Sequence, size: int) -> list:
    """``size`` items spread evenly over ``items`` (all of them when ``size`` is 0 or large)."""
    if size <= 0 or len(items) <= size:
        return list(items)
    return [items[int(i)] for i in np.unique(np.linspace(0, len(items) - 1, size).round().astype(int))]


def problems_of(results: Iterable[CheckResult]) -> list[str]:
    return [problem for result in results for problem in result.problems]


def raise_on_problems(results: Iterable[CheckResult]) -> None:
    """One error for all problems: the first, and how many more (the data doctor lists them all)."""
    problems = problems_of(results)
    if problems:
        more = (
            f" (and {len(problems) - 1} more; python -m vilbert.check_data lists them)"
            if len(problems) > 1
            else ""
        )
        raise DataProblemError(problems[0] + more)


# --- task YAML -------------------------------------------------------------------------------------


def task_paths(task: TaskConfig) -> list[tuple[str, str]]:
    """(key, path) of every file the task reads; names table and hard negatives live in ``dataroot``."""
    keys = ["dataroot", "features_h5path1", "train_annotations_jsonpath", "val_annotations_jsonpath"]
    if task.name in VCR_TASKS:
        keys.insert(2, "features_h5path2")
    paths = [(key, getattr(task, key)) for key in keys]
    if task.name in VCR_TASKS:
        paths.append((f"dataroot ({NAMES_TABLE})", os.path.join(task.dataroot, NAMES_TABLE)))
    return paths


def check_paths(task: TaskConfig, source: str) -> CheckResult:
    result = CheckResult(f"{task.key} {task.name}: files of the task YAML")
    paths = task_paths(task)
    result.count = len(paths)
    for key, path in paths:
        if not path:
            result.problems.append(f"{source}: {task.key} {key} is empty")
        elif not os.path.exists(path):
            result.problems.append(f"{source}: {task.key} {key}: {path} does not exist")
    if task.name not in VCR_TASKS and not os.path.isfile(os.path.join(task.dataroot, HARD_NEGATIVES)):
        result.warnings.append(
            f"{source}: {task.key} dataroot holds no {HARD_NEGATIVES}: the hard candidate is a random image"
        )
    return result


def check_batch(task: TaskConfig, source: str, shape: RunShape) -> CheckResult:
    result = CheckResult(
        f"{task.key} {task.name}: batch {task.batch_size} over {shape.world_size} process(es) "
        f"x {shape.gradient_accumulation_steps} accumulation",
        count=task.batch_size,
    )

    try:
        per_process_batch(task, shape.gradient_accumulation_steps, shape.world_size)
    except ValueError as err:
        result.problems.append(f"{source}: {err}")
    return result


@dataclass
class SplitAnnotations:
    """The image ids of one split's annotation file, and its VCR examples."""

    split: str
    path: str
    image_ids: list[int]
    examples: list[VCRExample] = field(default_factory=list)

    def label(self, task: TaskConfig) -> str:
        return f"{task.key} {self.split}"


def read_split(task: TaskConfig, split: str) -> SplitAnnotations:
    path = task.annotations(split)
    if task.name in VCR_TASKS:
        examples = load_vcr_annotations(path, task.name, labelled=split != "test")
        return SplitAnnotations(split, path, sorted({e.image_id for e in examples}), examples)
    return SplitAnnotations(split, path, load_retrieval_annotations(path).image_ids)


def check_ids(
    task: TaskConfig, annotations: SplitAnnotations, key: str, store: RegionFeatureStore
) -> CheckResult:
    result = CheckResult(
        f"{annotations.label(task)}: image ids of {os.path.basename(annotations.path)} in {key}"
    )
    result.count = len(annotations.image_ids)
    available = set(store.image_ids())
    missing = [i for i in annotations.image_ids if str(i) not in available]
    if missing:
        result.problems.append(
            f"{annotations.path}: {len(missing)} of {len(annotations.image_ids)} image ids are not in "
            f"{store.path} ({task.key} {key}): {preview(missing)}"
        )
    return result


# --- region contents -------------------------------------------------------------------------------


class Tally:
    """Problems of one kind over many images, kept as the first image's line and a count."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def add(self, kind: str, line: str) -> None:
        self.first.setdefault(kind, line)
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def lines(self, total: int, what: str = "sampled images") -> list[str]:
        return [f"{line} ({self.counts[kind]} of {total} {what})" for kind, line in self.first.items()]


def layout_problems(
    where: str, width: int, boxes: np.ndarray, image_w: int, image_h: int, shape: RunShape
) -> list[tuple[str, str]]:
    """(kind, line) for features of another width than the model's and boxes not in pixel x1, y1, x2, y2."""
    found = []
    expected = shape.model_config.v_feature_size
    if width != expected:
        found.append(
            (
                "width",
                f"{where}: features have {width} dimensions but {shape.config_source} "
                f"v_feature_size is {expected}",
            )
        )
    if len(boxes) and min(image_w, image_h) > LARGE_IMAGE and float(boxes.max()) <= NORMALISED_EXTENT:
        found.append(
            (
                "normalised",
                f"{where}: boxes look normalised to [0, 1] in a {image_w}x{image_h} image; expected pixels",
            )
        )
    if len(boxes) and bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
        found.append(("order", f"{where}: a box has x2 < x1 or y2 < y1; expected x1, y1, x2, y2"))
    return found


def _regions(store: RegionFeatureStore, image_id: int, where: str, problems: Tally, shape: RunShape):
    """The image's regions with their layout problems tallied, or None when it cannot be read."""
    try:
        regions = store[image_id]
    except DATA_ERRORS as err:
        problems.add(f"{store.path} unreadable", str(err))
        return None
    for kind, line in layout_problems(
        where, regions.features.shape[1], regions.pixel_boxes[1:], regions.image_w, regions.image_h, shape
    ):
        problems.add(f"{store.path} {kind}", line)  # per file: VCR's two files are counted apart
    return regions


def check_retrieval_regions(
    task: TaskConfig, annotations: SplitAnnotations, store: RegionFeatureStore, shape: RunShape
) -> CheckResult:
    result = CheckResult(f"{annotations.label(task)}: regions of {os.path.basename(store.path)} vs config")
    available = set(store.image_ids())
    sample = spread_sample([i for i in annotations.image_ids if str(i) in available], shape.sample_images)
    result.count = len(sample)
    problems, cut = Tally(), Tally()
    for image_id in sample:
        where = f"{store.path} image {image_id}"
        regions = _regions(store, image_id, where, problems, shape)
        if regions is not None and regions.num_boxes > task.max_region_num:
            cut.add(
                "cut",
                f"{where}: {regions.num_boxes} regions (global one included) but {task.key} max_region_num "
                f"is {task.max_region_num}; the rest are dropped",
            )
    result.problems, result.warnings = problems.lines(len(sample)), cut.lines(len(sample))
    return result


def max_reference(example: VCRExample) -> int:
    """The highest object index a VCR question, answer or rationale refers to (-1 for none)."""
    texts = [example.question, *example.answers, *example.rationales]
    return max((i for text in texts for item in text if isinstance(item, list) for i in item), default=-1)


def _check_references(
    task: TaskConfig,
    path: str,
    examples: list[VCRExample],
    image_id: int,
    ground_truth: RegionFeatures,
    gt_path: str,
    tallies: tuple[Tally, Tally],
) -> None:
    problems, dropped = tallies
    boxes = ground_truth.num_boxes - 1
    kept = min(task.max_region_num - 1, boxes)
    for example in examples:
        ref = max_reference(example)
        if ref >= boxes:
            problems.add(
                "ref",
                f"{path}: annot_id {example.annot_id!r} refers to object {ref} but image {image_id} has "
                f"{boxes} ground-truth boxes in {gt_path}",
            )
        elif ref >= kept:
            dropped.add(
                "dropped",
                f"{path}: annot_id {example.annot_id!r} refers to object {ref}, beyond the {kept} "
                f"ground-truth boxes {task.key} max_region_num {task.max_region_num} keeps",
            )


def check_vcr_regions(
    task: TaskConfig,
    annotations: SplitAnnotations,
    detected: RegionFeatureStore,
    ground_truth: RegionFeatureStore,
    shape: RunShape,
) -> list[CheckResult]:
    """Both feature files against the config, and every object reference against the image's boxes."""
    label = annotations.label(task)
    regions = CheckResult(f"{label}: regions of both feature files vs config")
    refs = CheckResult(f"{label}: object references of {os.path.basename(annotations.path)} within the boxes")
    by_image: dict[int, list[VCRExample]] = {}
    for example in annotations.examples:
        by_image.setdefault(example.image_id, []).append(example)
    available = set(detected.image_ids()) & set(ground_truth.image_ids())
    sample = spread_sample([i for i in sorted(by_image) if str(i) in available], shape.sample_images)
    problems, cut, ref_problems, dropped = Tally(), Tally(), Tally(), Tally()
    for image_id in sample:
        det = _regions(detected, image_id, f"{detected.path} image {image_id}", problems, shape)
        gt = _regions(ground_truth, image_id, f"{ground_truth.path} image {image_id}", problems, shape)
        if det is None or gt is None:
            continue
        if det.num_boxes + gt.num_boxes - 1 > task.max_region_num:
            cut.add(
                "cut",
                f"{detected.path} image {image_id}: {det.num_boxes + gt.num_boxes - 1} detected + "
                f"ground-truth regions but {task.key} max_region_num is {task.max_region_num}; "
                "detected ones are dropped",
            )
        _check_references(
            task,
            annotations.path,
            by_image[image_id],
            image_id,
            gt,
            ground_truth.path,
            (ref_problems, dropped),
        )
    checked = sum(len(by_image[i]) for i in sample)
    regions.count, refs.count = len(sample), checked
    regions.problems, regions.warnings = problems.lines(len(sample)), cut.lines(len(sample))
    refs.problems = ref_problems.lines(checked, "sampled annotations")
    refs.warnings = dropped.lines(checked, "sampled annotations")
    return [regions, refs]


def check_hard_negatives(task: TaskConfig, annotations: SplitAnnotations) -> list[CheckResult]:
    path = os.path.join(task.dataroot, HARD_NEGATIVES)
    if not os.path.isfile(path):
        return []
    result = CheckResult(f"{annotations.label(task)}: {HARD_NEGATIVES} ids vs the training ids")
    result.count = len(annotations.image_ids)
    try:
        load_hard_negative_pool(path, annotations.image_ids)
    except DATA_ERRORS as err:
        result.problems.append(f"{err} (training ids of {annotations.path})")
    return [result]


# --- per task and per pretraining split ----------------------------------------------------------


class _Stores:
    """Each feature LMDB opened once; one that cannot be opened is a problem, reported once."""

    def __init__(self) -> None:
        self._stores: dict[str, RegionFeatureStore | str] = {}

    def __call__(self, path: str) -> RegionFeatureStore | str:
        """The store, or the one-line reason it cannot be read."""
        if path not in self._stores:
            try:
                store = RegionFeatureStore(path)
                store.image_ids()
                self._stores[path] = store
            except DATA_ERRORS as err:
                self._stores[path] = str(err)
        return self._stores[path]


def _feature_keys(task: TaskConfig) -> tuple[str, ...]:
    return ("features_h5path1", "features_h5path2") if task.name in VCR_TASKS else ("features_h5path1",)


def check_split(task: TaskConfig, split: str, shape: RunShape, stores: _Stores) -> list[CheckResult]:
    """Ids, regions, references and (training split) hard negatives of one split's annotations."""
    try:
        annotations = read_split(task, split)
    except DATA_ERRORS as err:
        return [CheckResult(f"{task.key} {split} annotations", problems=[str(err)])]
    results, opened = [], []
    for key in _feature_keys(task):
        store = stores(getattr(task, key))
        if isinstance(store, str):
            results.append(CheckResult(f"{task.key} {key}", problems=[f"{store} ({task.key} {key})"]))
            continue
        results.append(check_ids(task, annotations, key, store))
        opened.append(store)
    if len(opened) == len(_feature_keys(task)):
        if task.name in VCR_TASKS:
            results += check_vcr_regions(task, annotations, opened[0], opened[1], shape)
        else:
            results.append(check_retrieval_regions(task, annotations, opened[0], shape))
    if split == task.train_split and task.name not in VCR_TASKS:
        results += check_hard_negatives(task, annotations)
    return results


def check_task(task: TaskConfig, source: str, shape: RunShape, stores: _Stores) -> list[CheckResult]:
    results = [check_paths(task, source), check_batch(task, source, shape)]
    missing = {path for _, path in task_paths(task) if not path or not os.path.exists(path)}
    for split in dict.fromkeys((task.train_split, task.val_split)):
        needed = {task.annotations(split), *(getattr(task, key) for key in _feature_keys(task))}
        if not needed & missing:
            results += check_split(task, split, shape, stores)
    return results


def check_task_data(task_config: str, tasks: str, shape: RunShape) -> list[CheckResult]:
    """Every check of the selected tasks (``--tasks 1-2``) of a task YAML."""
    try:
        configs = select_tasks(load_task_configs(task_config), tasks, task_config)
    except DATA_ERRORS as err:
        return [CheckResult(f"task YAML {task_config}", problems=[str(err)])]
    stores = _Stores()
    return [result for task in configs for result in check_task(task, task_config, shape, stores)]


def _datapoint_checks(
    lmdb: PretrainingLMDB, captions: dict[str, str], caption_json: str, data: PretrainingData, shape: RunShape
) -> tuple[CheckResult, CheckResult]:
    name = os.path.basename(lmdb.path)
    sample = spread_sample(range(len(lmdb)), shape.sample_images)
    coverage = CheckResult(f"pretraining: {name} images captioned in {os.path.basename(caption_json)}")
    regions = CheckResult(f"pretraining: regions of {name} vs config and --region_len")
    coverage.count = regions.count = len(sample)
    problems, cut, uncaptioned = Tally(), Tally(), []
    targets = shape.model_config.region_target_size
    for index in sample:
        try:
            point = lmdb[index]
        except DATA_ERRORS as err:
            problems.add("unreadable", str(err))
            continue
        where = f"{lmdb.path} image {point.image_id}"
        if point.image_id not in captions:
            uncaptioned.append(point.image_id)
        # Every value, the rows no batch reads included (the loader checks those it copies).
        problem = region_record_problem(
            point.features, point.boxes, point.image_w, point.image_h, point.num_boxes, point.cls_prob
        )
        if problem is not None:
            problems.add("record", f"{where}: {problem}")
        for kind, line in layout_problems(
            where, point.features.shape[1], point.boxes, point.image_w, point.image_h, shape
        ):
            problems.add(kind, line)
        if not data.predict_feature and point.cls_prob.shape[-1] != targets:
            problems.add(
                "classes",
                f"{where}: {point.cls_prob.shape[-1]} detector classes but {shape.config_source} "
                f"v_target_size is {targets}",
            )
        if point.num_boxes > data.region_len:
            cut.add("cut", f"{where}: {point.num_boxes} regions but --region_len is {data.region_len}")
    if uncaptioned:
        coverage.problems.append(
            f"{caption_json}: {len(uncaptioned)} of {len(sample)} sampled images of {lmdb.path} have no "
            f"caption: {preview(uncaptioned)}"
        )
    regions.problems, regions.warnings = problems.lines(len(sample)), cut.lines(len(sample))
    return coverage, regions


def check_pretraining_split(
    data_dir: str, split: str, flag: str, data: PretrainingData, shape: RunShape
) -> list[CheckResult]:
    files = CheckResult(f"pretraining {split}: LMDB and caption json in {flag}", count=2)
    try:
        lmdb_path, caption_json = pretraining_files(data_dir, split)
        captions = load_caption_json(caption_json)
        lmdb = PretrainingLMDB(lmdb_path)
        lmdb.keys()
    except DATA_ERRORS as err:
        files.problems.append(f"{flag} {data_dir}: {err}")
        return [files]
    return [files, *_datapoint_checks(lmdb, captions, caption_json, data, shape)]


def check_pretraining_data(data: PretrainingData, shape: RunShape) -> list[CheckResult]:
    """Both pretraining splits, and the batch against the accumulation steps."""
    accumulation = shape.gradient_accumulation_steps
    batch = CheckResult(
        f"pretraining: --train_batch_size {data.train_batch_size} x {accumulation} accumulation",
        count=data.train_batch_size,
    )
    if data.train_batch_size % accumulation:
        batch.problems.append(
            f"--train_batch_size {data.train_batch_size} is not divisible by "
            f"--gradient_accumulation_steps {accumulation}"
        )
    return [
        *check_pretraining_split(data.train_data_dir, "train", "--train_data_dir", data, shape),
        *check_pretraining_split(data.val_data_dir, "val", "--val_data_dir", data, shape),
        batch,
    ]


def require_task_data(
    task_config: str,
    tasks: str,
    model_config: BertConfig,
    config_source: str = "--config_file",
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
    sample_images: int = STARTUP_SAMPLE,
) -> None:
    """The start-up check of ``train_tasks.py``: raises :class:`DataProblemError` on any problem."""
    shape = RunShape(model_config, config_source, world_size, gradient_accumulation_steps, sample_images)
    raise_on_problems(check_task_data(task_config, tasks, shape))


def require_pretraining_data(
    data: PretrainingData,
    model_config: BertConfig,
    config_source: str = "--config_file",
    gradient_accumulation_steps: int = 1,
    sample_images: int = STARTUP_SAMPLE,
) -> None:
    """The start-up check of ``train_concap.py``: raises :class:`DataProblemError` on any problem."""
    shape = RunShape(model_config, config_source, 1, gradient_accumulation_steps, sample_images)
    raise_on_problems(check_pretraining_data(data, shape))
