"""Attention maps (``vilbert.attention_maps``): the word→region numbers are the model's own attention
(rows sum to 1 over the joint sequence, the slice matches a direct padded forward), the PNG and JSON
are written, bad input is one line with exit status 2, the pointing game is scored as stated, and on
a model trained on the synthetic world the words point at the objects they name, far above chance."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, task_world
from vilbert.attention_maps import (
    AttentionMap,
    PointingTarget,
    attention_map,
    pointing_game,
    write_attention_map,
)
from vilbert.attention_maps import main as attention_main
from vilbert.config import BertConfig
from vilbert.datasets.retrieval import encode_captions, load_retrieval_annotations, pad_regions
from vilbert.datasets.synthetic import (
    SyntheticWorld,
    SyntheticWorldConfig,
    flickr_scenes,
    generate_synthetic_world,
)
from vilbert.inference import RankSettings, load_model, open_features
from vilbert.modeling import InterBertForMultiModalPreTraining

TINY = os.path.join(ROOT, "config", "interbert_tiny.json")
PROG = "python -m vilbert.attention_maps"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = RankSettings(max_seq_length=30, max_region_num=12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A small world and a random tiny pretraining model saved as a model folder."""
    root = tmp_path_factory.mktemp("attention")
    task_world(str(root / "world"), 0, flickr=(2, 4, 2), vcr=(2, 2, 2))
    values = json.loads(Path(TINY).read_text())
    values["initializer_range"] = 0.2  # attention far from uniform
    torch.manual_seed(0)
    model = InterBertForMultiModalPreTraining(BertConfig(**values))
    flickr = root / "world" / "flickr30k"
    annotations = load_retrieval_annotations(str(flickr / "all_data_final_val_set0_2014.jsonline"))
    return {
        "root": root,
        "folder": model.save_pretrained(str(root / "model"), vocab="bert-base-uncased"),
        "features": str(flickr / "flickr30k_resnet101_faster_rcnn_genome.lmdb"),
        "image_id": str(annotations.image_ids[1]),
        "caption": annotations.captions[5],  # the first caption of image 1
    }


@pytest.fixture(scope="module")
def loaded(world):
    return load_model(world["folder"])


@pytest.fixture(scope="module")
def attention(world, loaded) -> AttentionMap:
    regions = open_features(world["features"])[world["image_id"]]
    return attention_map(loaded, regions, world["caption"], world["image_id"], SETTINGS)


def test_rows_are_distributions_and_the_slice_is_the_models_attention(world, loaded, attention):
    config = loaded.config
    regions = open_features(world["features"])[world["image_id"]]
    tokens, num_regions = len(attention.tokens), regions.num_boxes
    assert attention.tokens[0] == "[CLS]" and attention.tokens[-1] == "[SEP]"
    assert attention.token_rows.shape == (config.num_hidden_layers, tokens, num_regions + tokens)
    assert np.abs(attention.token_rows.sum(axis=2) - 1).max() < 1e-5
    assert attention.pixel_boxes.shape == (num_regions, 4)
    assert attention.pixel_boxes[0].tolist() == [0, 0, regions.image_w, regions.image_h]

    # The direct call: the model's forward on the padded pair, as the loaders pad it.
    text = encode_captions(loaded.tokenizer, [world["caption"]], SETTINGS.max_seq_length)
    image = pad_regions(regions, SETTINGS.max_region_num)
    with torch.no_grad():
        out = loaded.model.bert(
            torch.from_numpy(text["input_ids"]),
            torch.from_numpy(image["image_feat"][None]),
            torch.from_numpy(image["image_loc"][None]),
            torch.from_numpy(text["segment_ids"]),
            torch.from_numpy(text["input_mask"]),
            torch.from_numpy(image["image_mask"][None]),
            output_attentions=True,
        )
    padded = SETTINGS.max_region_num
    for layer in range(config.num_hidden_layers):
        probs = out.attentions[layer][0].mean(dim=0).numpy()  # [L, L] over [12 regions ; 30 tokens]
        rows = probs[padded : padded + tokens]
        np.testing.assert_allclose(attention.word_to_region[layer], rows[:, :num_regions], atol=1e-6)
        np.testing.assert_allclose(
            attention.token_rows[layer, :, num_regions:], rows[:, padded : padded + tokens], atol=1e-6
        )
        assert rows[:, num_regions:padded].max() < 1e-8  # padded regions get nothing
    assert np.allclose(attention.layer("mean"), attention.word_to_region.mean(axis=0))
    assert attention.word_to_region.std() > 1e-3  # not uniform: the comparison says something


def test_png_and_numbers_are_written(world, loaded, attention, tmp_path):
    pieces = loaded.tokenizer.tokenize(attention.tokens[3])
    numbers = write_attention_map(attention, str(tmp_path / "map.png"), pieces, layer="all")
    assert (tmp_path / "map.png").read_bytes()[:8] == PNG_SIGNATURE
    written = json.loads((tmp_path / "map.json").read_text())
    assert written == json.loads(json.dumps(numbers))
    assert written["word"] == attention.tokens[3] and written["word_token"] == 3
    assert np.allclose(written["word_to_region"], attention.word_to_region)
    assert np.allclose(written["word_to_region_mean"], attention.layer("mean"))
    assert written["boxes"][0] == [0, 0, attention.image_w, attention.image_h]


@pytest.mark.slow
def test_the_command_line_over_an_image_file(world, attention, tmp_path):
    """``--image``: the boxes over the image itself (here any picture of the right size)."""
    from matplotlib import image as mpimg

    picture = tmp_path / "photo.png"
    mpimg.imsave(picture, np.random.default_rng(0).random((attention.image_h, attention.image_w, 3)))
    output = tmp_path / "out" / "attention.png"
    output.parent.mkdir()
    word = next(token for token in attention.tokens[1:-1] if token.isalpha())
    command = [
        sys.executable, "-m", "vilbert.attention_maps", "--from_pretrained", world["folder"],
        "--features", world["features"], "--image_id", world["image_id"], "--caption", world["caption"],
        "--word", word, "--layer", "1", "--image", str(picture), "--output", str(output),
        "--max_region_num", "12",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    numbers = json.loads(output.with_suffix(".json").read_text())
    assert numbers["word"] == word and numbers["caption"] == world["caption"]
    np.testing.assert_allclose(numbers["word_to_region"], attention.word_to_region, atol=1e-6)


@pytest.fixture(scope="module")
def bad_inputs(world) -> dict[str, list[str]]:
    root = world["root"] / "bad"
    root.mkdir()
    (root / "taken.png").write_bytes(b"")

    def case(*extra: str, image_id: str = world["image_id"]) -> list[str]:
        return [
            "--from_pretrained", world["folder"], "--features", world["features"], "--image_id", image_id,
            "--caption", world["caption"], "--output", str(root / "map.png"), *extra,
        ]  # fmt: skip

    return {
        "unknown_word": case("--word", "zebra"),
        "layer_out_of_range": case("--layer", "2"),
        "unknown_image": case(image_id="987654"),
        "output_exists": case("--output", str(root / "taken.png")),
        "missing_image_file": case("--image", str(root / "nowhere.jpg")),
    }


BAD_INPUT_MESSAGES = {
    "unknown_word": ["--word 'zebra' is not in the caption's tokens: [CLS]"],
    "layer_out_of_range": ["--layer 2: the model has 2 interaction layers"],
    "unknown_image": ["image id '987654' not found in region-feature LMDB"],
    "output_exists": ["taken.png already exists; pass --overwrite"],
    "missing_image_file": ["--image", "nowhere.jpg: no such file"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_MESSAGES))
def test_bad_input_is_one_line_naming_the_culprit(bad_inputs, case, capsys):
    assert attention_main(bad_inputs[case]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), captured.err
    for part in BAD_INPUT_MESSAGES[case]:
        assert part in lines[0], lines[0]


def test_pointing_game_counts_hits_against_chance(attention):
    """On a hand-made map: token 1 looks hardest at box 2, token 2 at box 1; box 2 is the target."""
    rows = np.zeros_like(attention.token_rows)
    rows[:, 1, 2], rows[:, 2, 1] = 0.5, 0.5
    made = AttentionMap(**{**attention.__dict__, "token_rows": rows})
    boxes = attention.num_regions - 1
    result = pointing_game([PointingTarget(made, 1, [2]), PointingTarget(made, 2, [2, 3])])
    assert (result.hits, result.total, result.rate) == (1, 2, 0.5)
    assert result.chance == pytest.approx((1 / boxes + 2 / boxes) / 2)


# The pointing game on a model trained on the synthetic world (``tests/data/pointing/README.md`` says
# how it was trained: ``train_concap.py`` on this world, 48 epochs).
POINTING_MODEL = os.path.join(ROOT, "tests", "data", "pointing")
POINTING_WORLD = dataclasses.replace(
    SyntheticWorldConfig.small(seed=1),
    pretrain_train_images=6000,
    pretrain_val_images=50,
    flickr_train_images=2,
    flickr_val_images=2,
    flickr_test_images=40,
    vcr_train_questions=2,
    vcr_val_questions=2,
    vcr_test_questions=2,
)
POINTING_RATE_AT_LEAST = 1.5  # x chance


def test_a_trained_models_words_point_at_the_objects_they_name(tmp_path):
    """Every class word of two captions of each of the 40 Flickr30K test images (scenes the model never
    saw): its most-attended detected box (interaction layers' mean) is one of the named object's boxes
    far more often than a box picked at random is (``pointing_game``'s chance)."""
    files = generate_synthetic_world(str(tmp_path / "world"), POINTING_WORLD)
    loaded = load_model(POINTING_MODEL)
    features = open_features(
        os.path.join(files.flickr30k, "flickr30k_test_resnet101_faster_rcnn_genome.lmdb")
    )
    settings = RankSettings(max_seq_length=24, max_region_num=POINTING_WORLD.flickr_max_region_num)
    targets = []
    for split, image_id, scene, sentences in flickr_scenes(SyntheticWorld(POINTING_WORLD)):
        if split != "test":
            continue
        for sentence in sentences[:2]:
            attention = attention_map(loaded, features[str(image_id)], sentence, str(image_id), settings)
            for token, word in enumerate(attention.tokens):
                if regions := scene.regions_of(word):
                    targets.append(PointingTarget(attention, token, regions))
    result = pointing_game(targets, layer="mean")
    assert result.total >= 150
    assert result.rate >= POINTING_RATE_AT_LEAST * result.chance, (
        f"pointing rate {result.rate:.1%} against {result.chance:.1%} chance over {result.total} words"
    )
