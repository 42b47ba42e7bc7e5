"""A small grounded synthetic world in the real on-disk formats (``docs/data.md`` §5).

No real data can be downloaded for tests, benchmarks or the demo, so this writes Conceptual
Captions, Flickr30K and VCR look-alikes through the project's own writers, to be read back by the
real readers. Each image holds a few objects (a class and a colour); each object is seen by 1-4
overlapping detector boxes (so IoU >= 0.4 groups form for group masking); a region feature is
class prototype + colour prototype + noise; the detector class distribution peaks at the object's
class. Captions, retrieval sentences and VCR answers/rationales state true facts about the
objects, distractors false ones, so a model trained on it can beat chance by a wide margin.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import yaml

from vilbert.datasets.features import (
    PretrainDatapoint,
    PretrainingLMDBWriter,
    RegionFeatureStore,
    RegionFeatureWriter,
)
from vilbert.datasets.hard_negatives import build_hard_negative_pool, flickr_image_id, write_hard_negatives
from vilbert.datasets.jsonl import write_jsonl
from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

# Whole words of the bert-base-uncased vocabulary (checked by ``check_vocabulary``).
OBJECT_CLASSES = (
    "person", "man", "woman", "boy", "girl", "dog", "cat", "horse", "bird", "cow", "sheep",
    "elephant", "car", "bus", "truck", "bike", "boat", "train", "plane", "tree", "flower", "house",
    "table", "chair", "bench", "ball", "hat", "bag", "phone", "cup", "book", "umbrella",
)  # fmt: skip
ATTRIBUTES = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple")
RELATIONS = ("next to", "near", "beside", "behind", "in front of", "with")
CAPTION_PREFIXES = ("", "there is ", "a photo of ", "this picture shows ", "we can see ")
UNISEX_NAMES = (
    "casey", "riley", "jessie", "jackie", "avery", "jaime", "peyton", "kerry", "jody", "kendall",
    "frankie", "pat", "quinn", "harley", "reese", "robbie", "jamie", "morgan", "alex", "taylor",
)  # fmt: skip
PERSON = OBJECT_CLASSES.index("person")
VCR_ID_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}


@dataclass
class SyntheticWorldConfig:
    """Sizes of the synthetic world; the defaults generate in well under 30 s."""

    seed: int = 0
    feature_dim: int = 2048
    num_classes: int = 1601  # detector classes, background at index 0
    max_boxes: int = 36
    max_objects: int = 6
    pretrain_train_images: int = 500
    pretrain_val_images: int = 100
    flickr_train_images: int = 300
    flickr_val_images: int = 100
    flickr_test_images: int = 100
    vcr_train_questions: int = 600
    vcr_val_questions: int = 200
    vcr_test_questions: int = 200
    hard_negative_pool_size: int = 100
    task_batch_size: int | None = None  # None: the published batch sizes (32 / 32 / 64)
    flickr_max_region_num: int = 102
    vcr_max_region_num: int = 100
    noise_std: float = 0.5

    @classmethod
    def small(cls, seed: int = 0) -> SyntheticWorldConfig:
        """Matches ``config/interbert_tiny.json`` (v_feature_size 64, v_target_size 41); ~2 s."""
        return cls(
            seed=seed,
            feature_dim=64,
            num_classes=41,
            max_boxes=10,
            pretrain_train_images=200,
            pretrain_val_images=50,
            flickr_train_images=100,
            flickr_val_images=30,
            flickr_test_images=30,
            vcr_train_questions=200,
            vcr_val_questions=50,
            vcr_test_questions=50,
            hard_negative_pool_size=20,
            task_batch_size=8,
            flickr_max_region_num=12,
            vcr_max_region_num=16,
        )

    def validate(self) -> None:
        if self.num_classes < len(OBJECT_CLASSES) + 1:
            raise BadInputError(
                f"num_classes must be >= {len(OBJECT_CLASSES) + 1} (object classes + background)"
            )
        if not 2 <= self.max_objects <= self.max_boxes:
            raise BadInputError(f"need 2 <= max_objects ({self.max_objects}) <= max_boxes ({self.max_boxes})")
        if self.feature_dim < 1:
            raise BadInputError(f"feature_dim must be positive, got {self.feature_dim}")
        counts = {k: v for k, v in vars(self).items() if k.endswith(("_images", "_questions"))}
        for name, value in counts.items():
            if value < 2:
                raise BadInputError(f"{name} must be at least 2, got {value}")


@dataclass
class Scene:
    """One synthetic image: objects (class, colour, box) and the detector's view of them."""

    image_w: int
    image_h: int
    classes: np.ndarray  # [m] indices into OBJECT_CLASSES
    attributes: np.ndarray  # [m] indices into ATTRIBUTES
    object_boxes: np.ndarray  # [m, 4] pixels (the ground-truth boxes)
    boxes: np.ndarray  # [n, 4] detected boxes, pixels
    box_object: np.ndarray  # [n] owning object of each detected box
    features: np.ndarray  # [n, D]
    cls_prob: np.ndarray  # [n, C]

    def regions_of(self, word: str) -> list[int]:
        """The feature-file regions (1-based: region 0 is the global one) of the object whose class is
        ``word``; empty when no object of the scene has that class (classes are unique in a scene)."""
        named = [index for index, c in enumerate(self.classes) if OBJECT_CLASSES[c] == word]
        return [int(box) + 1 for box in np.flatnonzero(self.box_object == named[0])] if named else []

    def phrase(self, obj: int) -> str:
        """The object as a noun phrase: 'a red dog', 'an orange car'."""
        colour = ATTRIBUTES[self.attributes[obj]]
        return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {OBJECT_CLASSES[self.classes[obj]]}"


class SyntheticWorld:
    """Prototypes and scene generator; every draw comes from a generator seeded by the config."""

    def __init__(self, config: SyntheticWorldConfig) -> None:
        config.validate()
        self.config = config
        rng = np.random.default_rng([config.seed, 0])
        d = config.feature_dim
        self.class_prototypes = rng.normal(0.0, 1.0, (len(OBJECT_CLASSES), d)).astype(np.float32)
        self.attribute_prototypes = rng.normal(0.0, 0.8, (len(ATTRIBUTES), d)).astype(np.float32)

    def rng(self, part: int) -> np.random.Generator:
        """An independent stream per dataset part, so changing one size leaves the others alone."""
        return np.random.default_rng([self.config.seed, part])

    def region_features(
        self, rng: np.random.Generator, classes: np.ndarray, attributes: np.ndarray
    ) -> np.ndarray:
        noise = rng.normal(0.0, self.config.noise_std, (len(classes), self.config.feature_dim))
        return (self.class_prototypes[classes] + self.attribute_prototypes[attributes] + noise).astype(
            np.float32
        )

    def class_distribution(self, rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
        """Detector softmax: most mass on the object's class (index + 1; 0 is background)."""
        rest = rng.random((len(classes), self.config.num_classes)) ** 4
        rest /= rest.sum(axis=1, keepdims=True)
        peak = rng.uniform(0.5, 0.95, len(classes))
        probs = rest * (1.0 - peak)[:, None]
        probs[np.arange(len(classes)), classes + 1] += peak
        return probs.astype(np.float32)

    def scene(self, rng: np.random.Generator, with_person: bool = False) -> Scene:
        cfg = self.config
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        m = int(rng.integers(2, cfg.max_objects + 1))
        classes = rng.choice(len(OBJECT_CLASSES), size=m, replace=False)
        if with_person and PERSON not in classes:
            classes[0] = PERSON
        attributes = rng.integers(0, len(ATTRIBUTES), m)
        sizes = rng.uniform(0.15, 0.6, (m, 2)) * [w, h]
        corners = rng.uniform(0.0, 1.0, (m, 2)) * ([w, h] - sizes)
        object_boxes = np.concatenate([corners, corners + sizes], axis=1)

        per_object = rng.integers(1, 5, m)
        while per_object.sum() > cfg.max_boxes:
            per_object[np.argmax(per_object)] -= 1
        box_object = np.repeat(np.arange(m), per_object)
        rng.shuffle(box_object)
        base = object_boxes[box_object]
        extent = base[:, 2:] - base[:, :2]
        shift = rng.uniform(-0.08, 0.08, (len(base), 2)) * extent
        scale = rng.uniform(0.9, 1.1, (len(base), 2)) * extent
        centre = (base[:, :2] + base[:, 2:]) / 2 + shift
        boxes = np.concatenate([centre - scale / 2, centre + scale / 2], axis=1)
        boxes = np.clip(boxes, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
        return Scene(
            image_w=w,
            image_h=h,
            classes=classes,
            attributes=attributes,
            object_boxes=object_boxes.astype(np.float32),
            boxes=boxes,
            box_object=box_object,
            features=self.region_features(rng, classes[box_object], attributes[box_object]),
            cls_prob=self.class_distribution(rng, classes[box_object]),
        )


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A sentence naming 2-3 of the scene's objects and their colours: "a red dog next to a blue car"."""
    m = len(scene.classes)
    chosen = rng.permutation(m)[: int(rng.integers(2, min(3, m) + 1))]
    text = f"{scene.phrase(chosen[0])} {RELATIONS[rng.integers(len(RELATIONS))]} {scene.phrase(chosen[1])}"
    if len(chosen) == 3:
        text += f" and {scene.phrase(chosen[2])}"
    return CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))] + text


def region_record(image_id: int | str, scene: Scene, with_cls_prob: bool = True) -> dict[str, Any]:
    """The detector's boxes of ``scene`` as a :class:`RegionFeatureWriter` record."""
    return {
        "image_id": image_id,
        "image_h": scene.image_h,
        "image_w": scene.image_w,
        "num_boxes": len(scene.boxes),
        "boxes": scene.boxes,
        "features": scene.features,
        "cls_prob": scene.cls_prob if with_cls_prob else None,
    }


def ground_truth_record(image_id: int | str, scene: Scene, features: np.ndarray) -> dict[str, Any]:
    """One region per annotated object, at its ground-truth box (VCR's second feature LMDB)."""
    return {
        "image_id": image_id,
        "image_h": scene.image_h,
        "image_w": scene.image_w,
        "num_boxes": len(scene.object_boxes),
        "boxes": scene.object_boxes,
        "features": features,
    }


def check_vocabulary(vocab_file: str) -> None:
    """Every class, colour and relation word must be a whole token of the BERT vocabulary."""
    with open(vocab_file, encoding="utf-8") as f:
        vocab = {line.rstrip("\n") for line in f}
    words = {w for phrase in OBJECT_CLASSES + ATTRIBUTES + RELATIONS for w in phrase.split()}
    missing = sorted(words - vocab)
    if missing:
        raise BadInputError(
            f"{vocab_file}: synthetic-world words not in the vocabulary: {', '.join(missing)}"
        )


@dataclass
class SyntheticWorldFiles:
    """Where ``generate_synthetic_world`` put things (all under ``root``)."""

    root: str
    tasks_yaml: str
    tasks_eval_yaml: str
    conceptual_captions: str
    flickr30k: str
    vcr: str


def _planned_outputs(root: str) -> list[str]:
    return [
        os.path.join(root, "interbert_tasks.yml"),
        os.path.join(root, "conceptual_captions", "training_feat_all.lmdb"),
        os.path.join(root, "flickr30k", "flickr30k_resnet101_faster_rcnn_genome.lmdb"),
        os.path.join(root, "VCR", "VCR_resnet101_faster_rcnn_genome.lmdb"),
    ]


def generate_synthetic_world(
    output_dir: str, config: SyntheticWorldConfig | None = None, overwrite: bool = False
) -> SyntheticWorldFiles:
    """Write Conceptual Captions, Flickr30K and VCR look-alikes plus the two task YAMLs."""
    config = config or SyntheticWorldConfig()
    world = SyntheticWorld(config)
    if not overwrite:
        existing = [p for p in _planned_outputs(output_dir) if os.path.lexists(p)]
        if existing:
            raise FileExistsError(
                f"{existing[0]} already exists; pass overwrite=True (--overwrite) to replace it"
            )
    files = SyntheticWorldFiles(
        root=output_dir,
        tasks_yaml=os.path.join(output_dir, "interbert_tasks.yml"),
        tasks_eval_yaml=os.path.join(output_dir, "interbert_tasks_eval.yml"),
        conceptual_captions=os.path.join(output_dir, "conceptual_captions"),
        flickr30k=os.path.join(output_dir, "flickr30k"),
        vcr=os.path.join(output_dir, "VCR"),
    )
    for folder in (files.conceptual_captions, files.flickr30k, files.vcr):
        os.makedirs(folder, exist_ok=True)
    _write_conceptual_captions(world, files.conceptual_captions, overwrite)
    _write_flickr30k(world, files.flickr30k, overwrite)
    _write_vcr(world, files.vcr, overwrite)
    _write_task_yamls(config, files)
    logger.info("synthetic world written to %s", output_dir)
    return files


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _write_conceptual_captions(world: SyntheticWorld, folder: str, overwrite: bool) -> None:
    cfg = world.config
    splits = (
        ("training_feat_all.lmdb", "caption_train.json", cfg.pretrain_train_images, 1, 0),
        ("validation_all.lmdb", "caption_val.json", cfg.pretrain_val_images, 2, 10_000_000),
    )
    for lmdb_name, caption_name, count, part, first_id in splits:
        rng = world.rng(part)
        captions: dict[str, str] = {}
        with PretrainingLMDBWriter(os.path.join(folder, lmdb_name), overwrite=overwrite) as writer:
            for i in range(count):
                scene = world.scene(rng)
                image_id = str(first_id + i)
                captions[image_id] = caption(scene, rng)
                writer.add(
                    PretrainDatapoint(
                        features=scene.features,
                        cls_prob=scene.cls_prob,
                        boxes=scene.boxes,
                        num_boxes=len(scene.boxes),
                        image_h=scene.image_h,
                        image_w=scene.image_w,
                        image_id=image_id,
                        caption=captions[image_id],
                    )
                )
        _write_json(os.path.join(folder, caption_name), captions)


def flickr_scenes(world: SyntheticWorld) -> Iterator[tuple[str, int, Scene, list[str]]]:
    """(split, image id, scene, its 5 sentences) of the Flickr30K look-alike, as it was written: the
    ground truth (which detected box shows which object) that the files themselves do not carry."""
    cfg = world.config
    rng = world.rng(3)
    splits = (
        ("train", cfg.flickr_train_images),
        ("val", cfg.flickr_val_images),
        ("test", cfg.flickr_test_images),
    )
    for split_index, (split, count) in enumerate(splits):
        for i in range(count):
            scene = world.scene(rng)
            yield split, 100_000 * (split_index + 1) + i, scene, [caption(scene, rng) for _ in range(5)]


def _write_flickr30k(world: SyntheticWorld, folder: str, overwrite: bool) -> None:
    annotations: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    all_path = os.path.join(folder, "flickr30k_resnet101_faster_rcnn_genome.lmdb")
    test_path = os.path.join(folder, "flickr30k_test_resnet101_faster_rcnn_genome.lmdb")
    with (
        RegionFeatureWriter(all_path, overwrite=overwrite) as all_writer,
        RegionFeatureWriter(test_path, overwrite=overwrite) as test_writer,
    ):
        for split, image_id, scene, sentences in flickr_scenes(world):
            record = region_record(image_id, scene, with_cls_prob=False)
            all_writer.add(record)
            test_writer.add(record)
            entries = annotations[split]
            entries.append({"sentences": sentences, "id": len(entries), "img_path": f"{image_id}.jpg"})
    for split, name in (("train", "train"), ("val", "val_set0"), ("test", "test_set0")):
        write_jsonl(os.path.join(folder, f"all_data_final_{name}_2014.jsonline"), annotations[split])
    train_ids = [flickr_image_id(a) for a in annotations["train"]]
    pool_size = min(world.config.hard_negative_pool_size, len(train_ids))
    pool = build_hard_negative_pool(RegionFeatureStore(all_path), train_ids, pool_size)
    write_hard_negatives(os.path.join(folder, "hard_negative.pkl"), train_ids, pool, overwrite=overwrite)


def _other_colours(rng: np.random.Generator, colour: int, count: int = 3) -> list[str]:
    return [
        ATTRIBUTES[int(a)]
        for a in rng.permutation([a for a in range(len(ATTRIBUTES)) if a != colour])[:count]
    ]


def _vcr_question(scene: Scene, rng: np.random.Generator, kind: str) -> dict[str, Any]:
    """One multiple-choice question about ``scene``; object references are ``[index]`` lists.

    ``colour``: "what color is [i] ?" -> "[i] is red ." (distractors: other colours); rationale
    "[j] is blue and [i] is red ." (distractors: [j] in other colours).
    ``near``: "what is next to [i] ?" -> "the blue car is next to [i] ." for its nearest object
    (distractors: that object in another colour, or classes absent from the image); rationale
    "[i] is red and close to the car ." (distractors: [i] in other colours).
    Every right choice is a true fact of the image and every distractor a false one.
    """
    i, j = (int(x) for x in rng.permutation(len(scene.classes))[:2])
    colour_i = int(scene.attributes[i])
    if kind == "colour":
        colour_j = int(scene.attributes[j])
        question: list[Any] = ["what", "color", "is", [i], "?"]
        right_answer: list[Any] = [[i], "is", ATTRIBUTES[colour_i], "."]
        wrong_answers = [[[i], "is", c, "."] for c in _other_colours(rng, colour_i)]
        right_rationale: list[Any] = [
            [j],
            "is",
            ATTRIBUTES[colour_j],
            "and",
            [i],
            "is",
            ATTRIBUTES[colour_i],
            ".",
        ]
        wrong_rationales = [
            [[j], "is", c, "and", [i], "is", ATTRIBUTES[colour_i], "."] for c in _other_colours(rng, colour_j)
        ]
    else:
        centres = (scene.object_boxes[:, :2] + scene.object_boxes[:, 2:]) / 2
        distance = np.linalg.norm(centres - centres[i], axis=1)
        distance[i] = np.inf
        j = int(np.argmin(distance))
        name_j, colour_j = OBJECT_CLASSES[scene.classes[j]], int(scene.attributes[j])
        absent = [
            OBJECT_CLASSES[int(c)] for c in rng.permutation(len(OBJECT_CLASSES)) if c not in scene.classes
        ]
        question = ["what", "is", "next", "to", [i], "?"]
        right_answer = ["the", ATTRIBUTES[colour_j], name_j, "is", "next", "to", [i], "."]
        wrong_objects = [(_other_colours(rng, colour_j, 1)[0], name_j)]
        wrong_objects += [(ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))], name) for name in absent[:2]]
        wrong_answers = [
            ["the", colour, name, "is", "next", "to", [i], "."] for colour, name in wrong_objects
        ]
        right_rationale = [[i], "is", ATTRIBUTES[colour_i], "and", "close", "to", "the", name_j, "."]
        wrong_rationales = [
            [[i], "is", c, "and", "close", "to", "the", name_j, "."] for c in _other_colours(rng, colour_i)
        ]
    answers, answer_label = _shuffle_choices(rng, right_answer, wrong_answers)
    rationales, rationale_label = _shuffle_choices(rng, right_rationale, wrong_rationales)
    return {
        "question": question,
        "answer_choices": answers,
        "rationale_choices": rationales,
        "answer_label": answer_label,
        "rationale_label": rationale_label,
    }


def _shuffle_choices(
    rng: np.random.Generator, right: list[Any], wrong: list[list[Any]]
) -> tuple[list[Any], int]:
    label = int(rng.integers(0, len(wrong) + 1))
    choices = list(wrong)
    choices.insert(label, right)
    return choices, label


def _write_vcr(world: SyntheticWorld, folder: str, overwrite: bool) -> None:
    cfg = world.config
    rng = world.rng(4)
    images_root = os.path.join(folder, "vcr1images")
    splits = (
        ("train", cfg.vcr_train_questions),
        ("val", cfg.vcr_val_questions),
        ("test", cfg.vcr_test_questions),
    )
    with (
        RegionFeatureWriter(
            os.path.join(folder, "VCR_resnet101_faster_rcnn_genome.lmdb"), overwrite
        ) as detected,
        RegionFeatureWriter(
            os.path.join(folder, "VCR_gt_resnet101_faster_rcnn_genome.lmdb"), overwrite
        ) as gt,
    ):
        for split, num_questions in splits:
            lines: list[dict[str, Any]] = []
            for n in range(math.ceil(num_questions / 2)):
                scene = world.scene(rng, with_person=True)
                image_id = VCR_ID_OFFSETS[split] + n
                detected.add(region_record(image_id, scene))
                gt_features = world.region_features(rng, scene.classes, scene.attributes)
                gt.add(ground_truth_record(image_id, scene, gt_features))
                movie = f"lsmdc_synthetic_{split}_{n // 20:03d}"
                stem = f"{split}_{n:06d}"
                names = [OBJECT_CLASSES[c] for c in scene.classes]
                metadata_dir = os.path.join(images_root, movie)
                os.makedirs(metadata_dir, exist_ok=True)
                scores = rng.uniform(0.7, 1.0, len(names))
                _write_json(
                    os.path.join(metadata_dir, f"{stem}.json"),
                    {
                        "boxes": [[*map(float, box), float(s)] for box, s in zip(scene.object_boxes, scores)],
                        "names": names,
                        "width": scene.image_w,
                        "height": scene.image_h,
                    },
                )
                for kind in ("colour", "near")[: num_questions - len(lines)]:
                    line = _vcr_question(scene, rng, kind)
                    if split == "test":
                        del line["answer_label"], line["rationale_label"]
                    line.update(
                        img_id=f"{split}-{n}",
                        annot_id=f"{split}-{len(lines)}",
                        metadata_fn=f"{movie}/{stem}.json",
                        img_fn=f"{movie}/{stem}.jpg",
                        objects=names,
                    )
                    lines.append(line)
            write_jsonl(os.path.join(folder, f"{split}.jsonl"), lines)
    with open(os.path.join(folder, "unisex_names_table.csv"), "w", newline="", encoding="utf-8") as f:
        table = csv.writer(f)
        table.writerow(["", "name", "total", "male_share", "female_share", "gap"])
        for k, name in enumerate(UNISEX_NAMES):
            male = round(float(rng.uniform(0.4, 0.6)), 4)
            table.writerow(
                [
                    k,
                    name,
                    int(rng.integers(1000, 50000)),
                    male,
                    round(1 - male, 4),
                    round(abs(2 * male - 1), 4),
                ]
            )


def _task_entry(
    name: str,
    task_id: int,
    dataroot: str,
    features: tuple[str, str],
    annotations: tuple[str, str],
    max_seq_length: int,
    max_region_num: int,
    batch_size: int,
    val_split: str,
    num_epoch: int,
) -> dict[str, Any]:
    """One task of the published YAML, keys in the published order."""
    return {
        "name": name,
        "type": "VL-logit",
        "loss": "CrossEntropyLoss",
        "task_id": task_id,
        "dataroot": dataroot,
        "features_h5path1": features[0],
        "features_h5path2": features[1],
        "train_annotations_jsonpath": annotations[0],
        "val_annotations_jsonpath": annotations[1],
        "max_seq_length": max_seq_length,
        "max_region_num": max_region_num,
        "batch_size": batch_size,
        "train_split": "train",
        "val_split": val_split,
        "lr": 0.00002,
        "num_epoch": num_epoch,
    }


def task_file(config: SyntheticWorldConfig, evaluation: bool = False) -> dict[str, dict[str, Any]]:
    """``interbert_tasks.yml`` (or ``_eval``: Flickr30K test split) with paths relative to its folder."""
    vcr: dict[str, Any] = {
        "dataroot": "VCR",
        "features": (
            "VCR/VCR_resnet101_faster_rcnn_genome.lmdb",
            "VCR/VCR_gt_resnet101_faster_rcnn_genome.lmdb",
        ),
        "annotations": ("VCR/train.jsonl", "VCR/val.jsonl"),
        "max_region_num": config.vcr_max_region_num,
        "batch_size": config.task_batch_size or 32,
        "val_split": "val",
        "num_epoch": 20,
    }
    split = "test" if evaluation else "val"
    lmdb_name = "flickr30k_test" if evaluation else "flickr30k"
    return {
        "TASK1": _task_entry("VCR_Q-A", 6, max_seq_length=60, **vcr),
        "TASK2": _task_entry("VCR_QA-R", 7, max_seq_length=80, **vcr),
        "TASK3": _task_entry(
            "RetrievalFlickr30k",
            9,
            dataroot="flickr30k",
            features=(f"flickr30k/{lmdb_name}_resnet101_faster_rcnn_genome.lmdb", ""),
            annotations=(
                "flickr30k/all_data_final_train_2014.jsonline",
                f"flickr30k/all_data_final_{split}_set0_2014.jsonline",
            ),
            max_seq_length=30,
            max_region_num=config.flickr_max_region_num,
            batch_size=config.task_batch_size or 64,
            val_split=split,
            num_epoch=30,
        ),
    }


def _write_task_yamls(config: SyntheticWorldConfig, files: SyntheticWorldFiles) -> None:
    for path, evaluation in ((files.tasks_yaml, False), (files.tasks_eval_yaml, True)):
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(task_file(config, evaluation), f, sort_keys=False)


def replace_sizes(config: SyntheticWorldConfig, **sizes: int | None) -> SyntheticWorldConfig:
    """``config`` with the given sizes changed (``None`` values ignored), for command-line overrides."""
    return replace(config, **{k: v for k, v in sizes.items() if v is not None})


__all__ = [
    "ATTRIBUTES",
    "OBJECT_CLASSES",
    "Scene",
    "SyntheticWorld",
    "SyntheticWorldConfig",
    "SyntheticWorldFiles",
    "caption",
    "check_vocabulary",
    "flickr_scenes",
    "generate_synthetic_world",
    "replace_sizes",
    "task_file",
]
