"""VCR Q→A / QA→R datasets on a tiny world written with the project's own writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vilbert.datasets.features import (
    MissingImageError,
    RegionFeatures,
    RegionFeatureStore,
    write_region_features,
)
from vilbert.datasets.jsonl import AnnotationError
from vilbert.datasets.validation import BadRecordError
from vilbert.datasets.vcr import (
    VCRDataset,
    collate_vcr,
    load_unisex_names,
    merge_regions,
    truncate_pair,
    vcr_image_id,
)
from vilbert.tokenization import BertTokenizer, default_vocab_path

NAMES = ["casey", "jordan", "riley", "morgan", "avery", "quinn", "taylor", "jamie", "alex", "sam"]
OBJECTS = ["person", "person", "dog", "chair"]
FEATURE_DIM = 6
T, R = 24, 10
IMAGES = {"train-1": (3, 2), "train-7": (4, 3), "val-3": (2, 4), "test-2": (5, 1)}  # img_id: (det, gt) boxes


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(default_vocab_path())


def _example(k: int, img_id: str, labels: bool = True) -> dict:
    example = {
        "question": ["why", "is", [0], "near", [2], "?"],
        "answer_choices": [
            [[0], "is", "waiting", "."],
            [[1], "is", "sitting", "."],
            [[0, 1], "are", "friends", "."],
            ["the", [3], "is", "red", "."],
        ],
        "rationale_choices": [
            [[0], "looks", "at", [1], "."],
            ["the", [2], "is", "hungry", "."],
            ["it", "is", "late", "."],
            [[1], "smiles", "."],
        ],
        "objects": OBJECTS,
        "img_id": img_id,
        "annot_id": f"{img_id.split('-')[0]}-{k}",
        "metadata_fn": f"movie/{img_id}.json",
        "img_fn": f"movie/{img_id}.jpg",
    }
    if labels:
        example["answer_label"] = k % 4
        example["rationale_label"] = (k + 1) % 4
    return example


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _records(image: int, n: int, offset: float) -> dict:
    features = (offset + 1000.0 * image + np.arange(n, dtype=np.float32))[:, None].repeat(FEATURE_DIM, axis=1)
    boxes = np.array([[b, b, b + 10, b + 5] for b in range(n)], dtype=np.float32)
    return {
        "image_id": image,
        "image_h": 50,
        "image_w": 40,
        "num_boxes": n,
        "boxes": boxes,
        "features": features,
    }


@pytest.fixture
def world(tmp_path):
    det = str(tmp_path / "VCR_resnet101_faster_rcnn_genome.lmdb")
    gt = str(tmp_path / "VCR_gt_resnet101_faster_rcnn_genome.lmdb")
    write_region_features(det, [_records(vcr_image_id(i), n_det, 0.0) for i, (n_det, _) in IMAGES.items()])
    write_region_features(gt, [_records(vcr_image_id(i), n_gt, 500.0) for i, (_, n_gt) in IMAGES.items()])
    names = tmp_path / "unisex_names_table.csv"
    names.write_text(
        ",name,total,male_share,female_share,gap\n"
        + "".join(f"{i},{n},1,0.5,0.5,0\n" for i, n in enumerate(NAMES))
    )
    train = [_example(k, ["train-1", "train-7"][k % 2]) for k in range(12)]
    return {
        "train": _write_jsonl(tmp_path / "train.jsonl", train),
        "test": _write_jsonl(
            tmp_path / "test.jsonl", [_example(k, "test-2", labels=False) for k in range(3)]
        ),
        "det": RegionFeatureStore(det),
        "gt": RegionFeatureStore(gt),
        "names": str(names),
        "tmp": tmp_path,
    }


def _dataset(world, tokenizer, task="VCR_Q-A", split="train", seed=0, path=None, max_seq_length=T, **kw):
    return VCRDataset(
        task,
        path or world[split],
        world["gt"],
        world["det"],
        tokenizer,
        world["names"],
        max_seq_length=max_seq_length,
        max_region_num=R,
        split=split,
        seed=seed,
        **kw,
    )


def _parts(sample, row, tokenizer):
    """Text A and text B tokens of option ``row`` (without [CLS] and the closing [SEP]s)."""
    ids = sample["input_ids"][row][sample["input_mask"][row].astype(bool)]
    segments = sample["segment_ids"][row][: len(ids)]
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    a_end = int(np.argmax(segments == 1))
    assert tokens[a_end - 1] == "[SEP]" and not segments[:a_end].any() and segments[a_end:].all()
    return tokens[1 : a_end - 1], tokens[a_end:-1]


def test_image_id_mapping():
    assert vcr_image_id("train-123") == 123
    assert vcr_image_id("val-5") == 1_000_005
    assert vcr_image_id("test-0") == 2_000_000
    for bad in ("dev-3", "train-x", "train", "123"):
        with pytest.raises(ValueError, match="train-N"):
            vcr_image_id(bad)


def test_q_a_text_segments_and_consistent_names(world, tokenizer):
    dataset = _dataset(world, tokenizer)
    assert len(dataset) == 12
    sample = dataset[0]
    question, answer0 = _parts(sample, 0, tokenizer)
    person0, dog = question[2], question[4]
    assert dog == "dog" and person0 in NAMES
    assert question == ["why", "is", person0, "near", "dog", "?"]
    assert answer0 == [person0, "is", "waiting", "."]
    _, answer1 = _parts(sample, 1, tokenizer)
    person1 = answer1[0]
    assert person1 in NAMES and person1 != person0  # two people, two names
    _, answer2 = _parts(sample, 2, tokenizer)
    assert answer2[:2] == [person0, person1]  # [0, 1] reads as both names in a row, as published
    _, answer3 = _parts(sample, 3, tokenizer)
    assert answer3 == ["the", "chair", "is", "red", "."]
    for row in range(4):
        assert _parts(sample, row, tokenizer)[0] == question
    assert sample["target"] == 0 and sample["answer_index"] == -1
    assert sample["annot_id"] == "train-0" and sample["question_index"] == 0 and sample["image_id"] == 1


def test_qa_r_conditions_on_the_correct_answer_with_the_same_names(world, tokenizer):
    qa = _dataset(world, tokenizer)
    qar = _dataset(world, tokenizer, task="VCR_QA-R")
    for index in range(len(qar)):
        sample = qar[index]
        answer_label = index % 4
        assert sample["target"] == (index + 1) % 4 and sample["answer_index"] == answer_label
        question, _ = _parts(qa[index], 0, tokenizer)
        _, answer = _parts(qa[index], answer_label, tokenizer)
        text_a, rationale0 = _parts(sample, 0, tokenizer)
        assert text_a == question + ["[SEP]"] + answer
        person0, person1 = question[2], qa.object_names(index)[1]
        assert rationale0 == [person0, "looks", "at", person1, "."]
        assert _parts(sample, 1, tokenizer)[1] == ["the", "dog", "is", "hungry", "."]


def test_names_differ_across_examples_and_reproduce_with_the_seed(world, tokenizer):
    dataset = _dataset(world, tokenizer)
    names = [tuple(dataset.object_names(i)) for i in range(len(dataset))]
    assert all(n[2:] == ("dog", "chair") for n in names)
    assert len({n[:2] for n in names}) > 3
    assert [tuple(_dataset(world, tokenizer).object_names(i)) for i in range(len(dataset))] == names
    assert [tuple(_dataset(world, tokenizer, seed=1).object_names(i)) for i in range(len(dataset))] != names
    assert dataset[5]["input_ids"].tolist() == dataset[5]["input_ids"].tolist()  # not redrawn per call


def test_truncation_rule_and_special_tokens(world, tokenizer):
    assert truncate_pair(list(range(10)), [20, 21, 22], 8) == ([0, 1, 2, 3, 4], [20, 21, 22])
    assert truncate_pair([0, 1, 2], [5, 6, 7], 4) == ([0, 1], [5, 6])  # ties cut text B first
    assert truncate_pair([0], [5, 6, 7, 8], 3) == ([0], [5, 6])
    assert truncate_pair([0, 1], [5], 5) == ([0, 1], [5])

    long_question = ["why"] + ["very"] * 30 + ["?"]
    path = _write_jsonl(world["tmp"] / "long.jsonl", [{**_example(0, "train-1"), "question": long_question}])
    for task in ("VCR_Q-A", "VCR_QA-R"):
        sample = _dataset(world, tokenizer, task=task, path=path, max_seq_length=12)[0]
        assert sample["input_mask"].all()  # every option fills the 12 positions
        for row in range(4):
            tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"][row].tolist())
            assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
            text_a, text_b = _parts(sample, row, tokenizer)
            assert len(text_a) + len(text_b) == 12 - 3
            assert len(text_a) >= len(text_b) and text_a[0] == "why"


def _regions(features, boxes, image_w=40, image_h=50):
    n = len(features)
    return RegionFeatures(
        features=np.asarray(features, dtype=np.float32),
        boxes=np.asarray(boxes, dtype=np.float32),
        pixel_boxes=np.zeros((n, 4), dtype=np.float32),
        num_boxes=n,
        image_h=image_h,
        image_w=image_w,
    )


def test_merged_regions_by_hand():
    # Detected: global + 3 boxes (num_boxes 4); ground truth: global + 2 boxes (num_boxes 3).
    det = _regions(
        [[2.0, 0.0], [1.0, 1.0], [2.0, 0.0], [3.0, -1.0]],
        [[0, 0, 1, 1, 1]] + [[0.1 * b] * 5 for b in (1, 2, 3)],
    )
    gt = _regions(
        [[9.0, 2.0], [8.0, 3.0], [10.0, 1.0]], [[0, 0, 1, 1, 1]] + [[0.5 + 0.1 * b] * 5 for b in (1, 2)]
    )
    merged = merge_regions(det, gt, max_region_num=8)
    # (4 * [2, 0] + 3 * [9, 2]) / 7 = [35/7, 6/7]
    assert np.allclose(merged["image_feat"][0], [5.0, 6.0 / 7.0])
    assert np.allclose(merged["image_feat"][1:6], [[1, 1], [2, 0], [3, -1], [8, 3], [10, 1]])
    assert not merged["image_feat"][6:].any()
    assert merged["image_mask"].tolist() == [1] * 6 + [0] * 2
    assert np.allclose(merged["image_loc"][0], [0, 0, 1, 1, 1])
    assert np.allclose(merged["image_loc"][4:6, 0], [0.6, 0.7]) and not merged["image_loc"][6:].any()

    tight = merge_regions(det, gt, max_region_num=3)  # both GT boxes stay; only the global detected row
    assert np.allclose(tight["image_feat"], [[5.0, 6.0 / 7.0], [8, 3], [10, 1]]) and tight["image_mask"].all()
    tighter = merge_regions(det, gt, max_region_num=2)  # max_region_num - 1 GT boxes
    assert np.allclose(tighter["image_feat"], [[5.0, 6.0 / 7.0], [8, 3]])
    roomy = merge_regions(det, gt, max_region_num=5)  # R - 2 GT = 3 detected rows
    assert np.allclose(roomy["image_feat"][1:], [[1, 1], [2, 0], [8, 3], [10, 1]])

    with pytest.raises(ValueError, match="feature widths differ"):
        merge_regions(det, _regions(np.zeros((2, 3)), np.zeros((2, 5))), 4)


def test_sample_regions_come_from_both_lmdbs(world, tokenizer):
    sample = _dataset(world, tokenizer)[1]  # train-7: 4 detected + global, 3 GT + global
    det, gt = world["det"][7], world["gt"][7]
    assert sample["image_feat"].shape == (R, FEATURE_DIM) and sample["image_loc"].shape == (R, 5)
    assert sample["image_mask"].tolist() == [1] * 8 + [0] * 2
    assert np.allclose(sample["image_feat"][0], (det.features[0] * 5 + gt.features[0] * 4) / 9)
    assert np.allclose(sample["image_feat"][1:5], det.features[1:])
    assert np.allclose(sample["image_feat"][5:8], gt.features[1:])
    mask = np.concatenate([np.tile(sample["image_mask"], (4, 1)), sample["input_mask"]], axis=1)
    assert np.array_equal(sample["multimodal_mask"], mask)


def test_test_split_has_no_labels_and_expands_answers_for_qa_r(world, tokenizer):
    qa = _dataset(world, tokenizer, split="test")
    assert len(qa) == 3 and all(qa[i]["target"] == -1 for i in range(3))
    assert qa[0]["image_id"] == 2_000_002
    qar = _dataset(world, tokenizer, task="VCR_QA-R", split="test")
    assert len(qar) == 12
    for index in range(12):
        sample = qar[index]
        assert sample["target"] == -1 and sample["question_index"] == index // 4
        assert sample["answer_index"] == index % 4 and sample["annot_id"] == f"test-{index // 4}"
        question, answer = _parts(qa[index // 4], index % 4, tokenizer)
        assert _parts(sample, 0, tokenizer)[0] == question + ["[SEP]"] + answer
    assert qar.annot_ids == ["test-0", "test-1", "test-2"]


def test_collate(world, tokenizer):
    dataset = _dataset(world, tokenizer, task="VCR_QA-R")
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate_vcr)))
    assert batch["input_ids"].shape == (5, 4, T) and batch["input_ids"].dtype == torch.int64
    assert batch["image_feat"].shape == (5, R, FEATURE_DIM) and batch["image_mask"].shape == (5, R)
    assert batch["multimodal_mask"].shape == (5, 4, R + T)
    assert batch["target"].tolist() == [1, 2, 3, 0, 1]
    assert batch["annot_id"] == [f"train-{k}" for k in range(5)]


def test_bad_annotation_lines_name_file_and_line(world, tokenizer):
    good = _example(0, "train-1")
    cases = [
        ({k: v for k, v in good.items() if k != "answer_choices"}, "missing field 'answer_choices'"),
        ({**good, "rationale_choices": good["rationale_choices"][:3]}, "'rationale_choices' must hold 4"),
        ({**good, "question": ["who", [7]]}, r"refers to object \[7\] but the annotation has 4 objects"),
        ({**good, "question": ["who", {"x": 1}]}, "neither a word nor a list"),
        ({k: v for k, v in good.items() if k != "answer_label"}, "'answer_label'"),
        ({**good, "answer_label": 4}, "'answer_label'"),
        ({**good, "img_id": "dev-1"}, "train-N"),
    ]
    path = world["tmp"] / "bad.jsonl"
    for record, message in cases:
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
        with pytest.raises(AnnotationError, match=rf"{path}:3: .*{message}"):
            _dataset(world, tokenizer, path=str(path))
    no_rationale = {k: v for k, v in good.items() if k != "rationale_label"}
    path.write_text(json.dumps(no_rationale) + "\n")
    assert len(_dataset(world, tokenizer, path=str(path))) == 1  # Q→A does not need it
    with pytest.raises(AnnotationError, match=":1: .*'rationale_label'"):
        _dataset(world, tokenizer, task="VCR_QA-R", path=str(path))


def test_missing_images_and_other_bad_inputs(world, tokenizer):
    path = _write_jsonl(world["tmp"] / "orphan.jsonl", [_example(0, "train-1"), _example(1, "val-99")])
    with pytest.raises(MissingImageError, match=rf"image 1000099 of {path} .*{world['det'].path}"):
        _dataset(world, tokenizer, path=path)
    gt_only_missing = str(world["tmp"] / "gt_missing.lmdb")
    write_region_features(gt_only_missing, [_records(1, 2, 0.0)])
    with pytest.raises(MissingImageError, match=rf"image 7 .*{gt_only_missing}"):
        VCRDataset(
            "VCR_Q-A",
            world["train"],
            RegionFeatureStore(gt_only_missing),
            world["det"],
            tokenizer,
            world["names"],
        )
    with pytest.raises(ValueError, match="unknown VCR task"):
        _dataset(world, tokenizer, task="VCR_Q-AR")
    bad_csv = world["tmp"] / "names.csv"
    bad_csv.write_text("first,total\ncasey,3\n")
    with pytest.raises(ValueError, match=f"{bad_csv}: no 'name' column"):
        load_unisex_names(str(bad_csv))
    with pytest.raises(FileNotFoundError, match="names table not found"):
        load_unisex_names(str(world["tmp"] / "absent.csv"))
    assert load_unisex_names(world["names"]) == NAMES


def test_a_damaged_image_is_named_or_skipped_by_choice(world, tokenizer):
    damaged = str(world["tmp"] / "damaged_det.lmdb")
    records = [_records(vcr_image_id(i), n_det, 0.0) for i, (n_det, _) in IMAGES.items()]
    records[1]["boxes"][0] = [0, 0, 400, 5]  # train-7: a box ten times as wide as its 40-pixel image
    write_region_features(damaged, records)
    args = ("VCR_Q-A", world["train"], world["gt"])
    strict = VCRDataset(*args, RegionFeatureStore(damaged), tokenizer, world["names"], T, R)
    with pytest.raises(BadRecordError, match=rf"{damaged} key b'7': box 0 .* outside the 40x50 image"):
        [strict[i] for i in range(len(strict))]

    skipping = RegionFeatureStore(damaged, on_bad_record="skip")
    dataset = VCRDataset(*args, skipping, tokenizer, world["names"], T, R)
    samples = [dataset[i] for i in range(len(dataset))]
    assert len(samples) == 12 and {int(s["image_id"]) for s in samples} == {vcr_image_id("train-1")}
    assert skipping.bad_records.skipped == 1


def test_published_rules_truncate_the_shared_question_in_place(world, tokenizer):
    """Published: the question is cut in place while paired with each option in turn, so an option
    sees the question as the options before it left it. Options of different lengths show it: a
    long option cuts the question, and a later short option gets the cut question, not the whole."""
    long_question = ["why"] + ["very"] * 14 + ["?"]
    options = [["a"] * 12 + ["."], ["no", "."], ["yes", "."], ["maybe", "."]]
    example = {**_example(0, "train-1"), "question": long_question, "answer_choices": options}
    path = _write_jsonl(world["tmp"] / "shared.jsonl", [example])
    modern = _dataset(world, tokenizer, path=path, max_seq_length=16)[0]
    published = _dataset(world, tokenizer, path=path, max_seq_length=16, rules="published")[0]
    # 13 = 16 - 3 tokens for both texts. Option 0 (13 tokens) leaves the question 7 (ties cut B).
    assert [len(_parts(modern, row, tokenizer)[0]) for row in range(4)] == [7, 11, 11, 11]
    assert [len(_parts(published, row, tokenizer)[0]) for row in range(4)] == [7, 7, 7, 7]
    assert _parts(published, 0, tokenizer) == _parts(modern, 0, tokenizer)


def test_published_rules_draw_each_persons_name_on_its_own(world, tokenizer, tmp_path):
    """Published: one name per person, drawn independently, so two persons can share a name;
    corrected: the names of a question are distinct. Two names, two persons, many questions."""
    names = tmp_path / "two_names.csv"
    names.write_text(",name,total,male_share,female_share,gap\n0,casey,1,0.5,0.5,0\n1,jordan,1,0.5,0.5,0\n")
    path = _write_jsonl(tmp_path / "many.jsonl", [_example(k, "train-1") for k in range(40)])

    def shared_names(rules: str) -> int:
        dataset = VCRDataset(
            "VCR_Q-A", path, world["gt"], world["det"], tokenizer, str(names), T, R, rules=rules
        )
        return sum(len(set(dataset.object_names(q)[:2])) == 1 for q in range(len(dataset)))

    assert shared_names("modern") == 0
    assert 10 <= shared_names("published") <= 30  # about half of 40 (p = 1/2)
