"""Model folders: save/load round trips, export of published-layout checkpoints, the export CLI."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch

from vilbert.checkpoint import CheckpointError
from vilbert.config import BertConfig
from vilbert.ema import ExponentialMovingAverage
from vilbert.errors import BadInputError
from vilbert.model_export import export_checkpoint
from vilbert.model_folder import ModelFolderError, OutputExistsError, is_model_folder
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.tokenization import default_vocab_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "interbert_tiny.json")
FOLDER_FILES = ["README.md", "config.json", "model.safetensors", "vocab.txt"]


def tiny_config() -> BertConfig:
    return BertConfig.from_json_file(TINY)


def tiny_model(cls: type, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = cls(tiny_config(), **kwargs)
    with torch.no_grad():  # non-default values everywhere, biases and LayerNorms included
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def model_inputs(config: BertConfig, batch: int = 2, words: int = 7, regions: int = 5) -> dict:
    generator = torch.Generator().manual_seed(1)
    image_mask = torch.ones(batch, regions, dtype=torch.long)
    image_mask[1, -2:] = 0
    text_mask = torch.ones(batch, words, dtype=torch.long)
    text_mask[0, -1] = 0
    return dict(
        input_ids=torch.randint(1, config.vocab_size, (batch, words), generator=generator),
        image_feat=torch.randn(batch, regions, config.v_feature_size, generator=generator),
        image_loc=torch.rand(batch, regions, 5, generator=generator),
        token_type_ids=torch.zeros(batch, words, dtype=torch.long),
        attention_mask=text_mask,
        image_attention_mask=image_mask,
        multimodal_mask=torch.cat([image_mask, text_mask], 1),
    )


def outputs(model, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(model, InterBertForVLTasks):
        return [out.vil_prediction, out.vil_logit, out.vil_binary_prediction, out.vision_logit]
    return [out.text, out.image, out.itm]


def assert_same_weights(model, reference) -> None:
    own = model.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(own[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize(
    "cls, kwargs",
    [(InterBertForVLTasks, {"num_labels": 3}), (InterBertForMultiModalPreTraining, {})],
    ids=["vl", "pretraining"],
)
def test_round_trip_gives_identical_outputs(tmp_path, cls, kwargs):
    model = tiny_model(cls, **kwargs)
    folder = str(tmp_path / "model")
    card = {"recipe": "train_tasks.py --tasks 3", "metrics": {"R@1": 27.8}}
    model.save_pretrained(folder, vocab="bert-base-uncased", card=card)

    assert sorted(os.listdir(tmp_path)) == ["model"]  # no staging folder left behind
    assert sorted(os.listdir(folder)) == FOLDER_FILES and is_model_folder(folder)
    assert filecmp.cmp(os.path.join(folder, "vocab.txt"), default_vocab_path(), shallow=False)
    readme = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "train_tasks.py --tasks 3" in readme and "| R@1 | 27.8 |" in readme and cls.__name__ in readme

    loaded = cls.from_pretrained(folder, strict=True).eval()
    assert loaded.config == model.config
    assert getattr(loaded, "num_labels", None) == kwargs.get("num_labels")
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert_same_weights(loaded, model)
    inputs = model_inputs(model.config)
    for ours, theirs in zip(outputs(loaded, inputs), outputs(model, inputs)):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def published_bin(model, path: str, ema: bool) -> dict[str, torch.Tensor]:
    """Save the published way, ``torch.save(state_dict)`` of the DDP-wrapped model (``module.``
    prefixes); the EMA file holds averaged weights, unlike the model's own. Returns what was saved."""
    state = model.state_dict()
    if ema:
        average = ExponentialMovingAverage(model, decay=0.5)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1.5)
        average.update(model)
        state = {key: value.clone() for key, value in average.ema_state_dict().items()}
    torch.save({f"module.{key}": value for key, value in state.items()}, path)
    return state


def assert_holds(model, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(own[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("ema", [False, True], ids=["raw", "ema"])
@pytest.mark.parametrize("cls", [InterBertForVLTasks, InterBertForMultiModalPreTraining])
def test_export_of_published_bin_loads_with_no_missing_keys(tmp_path, cls, ema):
    checkpoint = str(tmp_path / "pytorch_model_4.bin")
    state = published_bin(tiny_model(cls), checkpoint, ema)
    folder = str(tmp_path / "exported")
    export_checkpoint(checkpoint, tiny_config(), "bert-base-uncased", folder)

    saved = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
    assert saved["architectures"] == [cls.__name__]  # the task was read off the checkpoint's keys
    assert_holds(cls.from_pretrained(folder, strict=True), state)  # strict: nothing missing or unexpected


def test_export_refuses_a_checkpoint_that_leaves_parameters_initialised(tmp_path):
    bert_only = {
        k: v for k, v in tiny_model(InterBertForVLTasks).state_dict().items() if k.startswith("bert.")
    }
    torch.save(bert_only, tmp_path / "bert.bin")
    with pytest.raises(CheckpointError, match=r"bert\.bin: .* not in the checkpoint, e\.g\. cls\.") as err:
        export_checkpoint(
            str(tmp_path / "bert.bin"), tiny_config(), "bert-base-uncased", str(tmp_path / "out")
        )
    assert isinstance(err.value, BadInputError) and not os.path.exists(tmp_path / "out")


def test_save_refuses_an_existing_folder_unless_overwrite(tmp_path):
    first, second = (
        tiny_model(InterBertForMultiModalPreTraining, 0),
        tiny_model(InterBertForMultiModalPreTraining, 1),
    )
    folder = str(tmp_path / "model")
    first.save_pretrained(folder)
    with pytest.raises(OutputExistsError, match="model already exists"):
        second.save_pretrained(folder)
    assert_same_weights(InterBertForMultiModalPreTraining.from_pretrained(folder), first)
    second.save_pretrained(folder, overwrite=True)
    assert_same_weights(InterBertForMultiModalPreTraining.from_pretrained(folder), second)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_loading_without_config_needs_a_model_folder(tmp_path):
    torch.save(tiny_model(InterBertForVLTasks).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="no config.json"):
        InterBertForVLTasks.from_pretrained(str(tmp_path))


def run_export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.slow
def test_export_cli_end_to_end_and_refusal_to_overwrite(tmp_path):
    checkpoint = str(tmp_path / "pytorch_model_0_ema.bin")
    state = published_bin(tiny_model(InterBertForVLTasks), checkpoint, ema=True)
    folder = str(tmp_path / "folder")
    args = [checkpoint, "--config_file", TINY, "--bert_model", "bert-base-uncased", "--output", folder]
    done = run_export(*args, "--task", "vl", "--recipe", "fine-tuned on the synthetic world")
    assert done.returncode == 0, done.stderr
    assert_holds(InterBertForVLTasks.from_pretrained(folder, strict=True), state)
    assert "fine-tuned on the synthetic world" in open(os.path.join(folder, "README.md")).read()

    refused = run_export(*args)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"export_model: error: {folder} already exists; pass --overwrite to replace it"
    ]
    assert run_export(*args, "--overwrite").returncode == 0
