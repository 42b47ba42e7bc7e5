"""Ranking with a trained model (``vilbert.inference``, ``python -m vilbert.rank``) on the synthetic
world: the scores are exactly those of ``eval_retrieval.py``'s score matrix, rows and columns; the
command line runs end to end; bad input is one line naming the culprit, exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, task_world
from vilbert.checkpoint import save_state_dict
from vilbert.config import BertConfig
from vilbert.datasets.retrieval import load_retrieval_annotations
from vilbert.inference import Ranker, RankSettings, load_model, open_features
from vilbert.metrics import top_k_images
from vilbert.modeling import InterBertForVLTasks
from vilbert.rank import main as rank_main
from vilbert.retrieval_eval import retrieval_main

TINY = os.path.join(ROOT, "config", "interbert_tiny.json")
PROG = "python -m vilbert.rank"
MAX_REGION_NUM = 12  # the small world's Flickr30K task


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A small world (12 Flickr30K test images, 60 captions), a random tiny model saved both as a
    published checkpoint and as a model folder, and ``eval_retrieval.py``'s results for it."""
    root = tmp_path_factory.mktemp("inference")
    task_world(str(root / "world"), 0, flickr=(2, 2, 12), vcr=(2, 2, 2))
    values = json.loads(Path(TINY).read_text())
    values["initializer_range"] = 0.2  # scores spread over (0, 1) rather than all near 0.5
    config_file = root / "tiny_spread.json"
    config_file.write_text(json.dumps(values))
    torch.manual_seed(0)
    model = InterBertForVLTasks(BertConfig(**values))
    checkpoint = str(root / "pytorch_model_0.bin")
    save_state_dict(model, checkpoint)
    folder = model.save_pretrained(str(root / "model"), vocab="bert-base-uncased")
    status = retrieval_main(
        [
            "--from_pretrained", checkpoint, "--config_file", str(config_file), "--tasks", "3",
            "--task_config", str(root / "world" / "interbert_tasks_eval.yml"), "--split", "test",
            "--output_dir", str(root / "results"), "--save_name", "eval", "--num_workers", "0", "--quiet",
        ]
    )  # fmt: skip
    assert status == 0
    report = json.loads((root / "results" / "eval" / "retrieval_test.json").read_text())
    flickr = root / "world" / "flickr30k"
    return {
        "root": root,
        "folder": folder,
        "checkpoint": checkpoint,
        "config_file": str(config_file),
        "features": str(flickr / "flickr30k_test_resnet101_faster_rcnn_genome.lmdb"),
        "captions": load_retrieval_annotations(
            str(flickr / "all_data_final_test_set0_2014.jsonline")
        ).captions,
        "image_ids": [str(image_id) for image_id in report["image_ids"]],
        "scores": np.load(root / "results" / "eval" / "scores_test.npy"),
        "report": report,
    }


@pytest.fixture(scope="module")
def ranker(world) -> Ranker:
    loaded = load_model(world["folder"])
    return Ranker(loaded, open_features(world["features"]), RankSettings(max_region_num=MAX_REGION_NUM))


def test_ranking_is_the_eval_score_matrix_row_by_row_and_column_by_column(world, ranker):
    captions, image_ids, expected = world["captions"], world["image_ids"], world["scores"]
    assert expected.shape == (60, 12) and expected.std() > 0.01
    scored = []
    matrix = ranker.score(captions, image_ids, scored.append)
    assert sum(scored) == 60 * 12
    assert np.array_equal(matrix.scores, expected)  # the same stream, bitwise

    by_caption = ranker.rank_images(captions, image_ids, k=5)
    assert [[hit.image_id for hit in r.hits] for r in by_caption] == [
        [str(i) for i in top[:5]] for top in world["report"]["top_image_ids"]
    ]
    for row, ranking in enumerate(by_caption):
        assert ranking.caption == captions[row]
        assert [hit.rank for hit in ranking.hits] == [1, 2, 3, 4, 5]
        best = top_k_images(expected[row : row + 1], 5)[0]
        assert [hit.score for hit in ranking.hits] == expected[row, best].tolist()

    by_image = ranker.rank_captions(image_ids, captions, k=3)
    for column, ranking in enumerate(by_image):
        best = np.argsort(-expected[:, column], kind="stable")[:3]
        assert ranking.image_id == image_ids[column]
        assert [hit.caption_index for hit in ranking.hits] == best.tolist()
        assert [hit.caption for hit in ranking.hits] == [captions[c] for c in best]
        assert [hit.score for hit in ranking.hits] == expected[best, column].tolist()


def test_a_few_captions_against_the_whole_lmdb_score_the_same(world, ranker):
    """Other captions and images in the stream: the same numbers up to a block's rounding."""
    picked = [7, 3, 42]
    matrix = ranker.score([world["captions"][i] for i in picked])
    assert sorted(matrix.image_ids) == sorted(open_features(world["features"]).image_ids())
    assert len(matrix.image_ids) == 16  # the test LMDB holds the train and val images too
    columns = [matrix.image_ids.index(image_id) for image_id in world["image_ids"]]
    assert np.abs(matrix.scores[:, columns] - world["scores"][picked]).max() < 1e-6


def test_a_checkpoint_with_its_config_scores_as_the_folder(world, ranker):
    loaded = load_model(world["checkpoint"], world["config_file"])
    assert type(loaded.model) is InterBertForVLTasks
    other = Ranker(loaded, ranker.features, ranker.settings)
    captions = world["captions"][:4]
    assert np.array_equal(other.score(captions).scores, ranker.score(captions).scores)


def _env() -> dict[str, str]:
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in launch}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")}


@pytest.mark.slow
def test_the_command_line_end_to_end(world, tmp_path):
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text(f"{world['captions'][0]}\n\n{world['captions'][11]}\n")
    output = tmp_path / "ranked.json"
    image_ids = world["image_ids"][:4]
    command = [
        sys.executable, "-m", "vilbert.rank", "--from_pretrained", world["folder"],
        "--features", world["features"], "--max_region_num", str(MAX_REGION_NUM),
        "--caption", world["captions"][5], "--captions_file", str(captions_file),
        "--image_ids", *image_ids, "--top_k", "3", "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert (report["num_captions"], report["num_images"], report["top_k"]) == (3, 4, 3)
    rows = [5, 0, 11]
    for ranking, row in zip(report["images_per_caption"], rows):
        assert ranking["caption"] == world["captions"][row]
        expected = {
            image_id: world["scores"][row, world["image_ids"].index(image_id)] for image_id in image_ids
        }
        best = sorted(image_ids, key=lambda image_id: -expected[image_id])[:3]
        assert [hit["image_id"] for hit in ranking["hits"]] == best
        assert all(abs(hit["score"] - expected[hit["image_id"]]) < 1e-6 for hit in ranking["hits"])
    assert [ranking["image_id"] for ranking in report["captions_per_image"]] == image_ids
    assert all(len(ranking["hits"]) == 3 for ranking in report["captions_per_image"])
    out = result.stdout.splitlines()
    assert out[0].startswith("caption 1: ") and out[1].split() == ["rank", "score", "image"]
    assert f"image {image_ids[0]}" in out

    again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"{PROG}: error: {output} already exists; pass --overwrite to replace it"
    ]


@pytest.fixture(scope="module")
def bad_inputs(world) -> dict[str, list[str]]:
    root = world["root"] / "bad"
    root.mkdir()
    (root / "empty.txt").write_text("\n  \n")

    def case(*extra: str, model: str = world["folder"], features: str = world["features"]) -> list[str]:
        return ["--from_pretrained", model, "--features", features, "--quiet", *extra]

    return {
        "unknown_image": case("--caption", "a red dog", "--image_ids", world["image_ids"][0], "987654"),
        "empty_captions_file": case("--captions_file", str(root / "empty.txt")),
        "no_captions_file": case("--captions_file", str(root / "nowhere.txt")),
        "missing_lmdb": case("--caption", "a red dog", features=str(root / "nowhere.lmdb")),
        "no_captions": case("--image_ids", world["image_ids"][0]),
        "checkpoint_without_config": case("--caption", "a red dog", model=world["checkpoint"]),
        "blank_caption": case("--caption", " "),
    }


BAD_INPUT_MESSAGES = {
    "unknown_image": ["image 987654 is not in the region-feature LMDB", "(1 of 2 given ids missing)"],
    "empty_captions_file": ["--captions_file", "empty.txt: no captions in it"],
    "no_captions_file": ["--captions_file", "nowhere.txt: no such file"],
    "missing_lmdb": ["--features", "nowhere.lmdb: no such feature LMDB"],
    "no_captions": ["no captions: give --caption TEXT or --captions_file FILE"],
    "checkpoint_without_config": ["pytorch_model_0.bin: not a model folder", "--config_file"],
    "blank_caption": ["--caption: caption 1 is empty"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_MESSAGES))
def test_bad_input_is_one_line_naming_the_culprit(bad_inputs, case, capsys):
    assert rank_main(bad_inputs[case]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), captured.err
    for part in BAD_INPUT_MESSAGES[case]:
        assert part in lines[0], lines[0]
