"""The flags both training scripts share: booleans parse as booleans, every flag says what it does."""

from __future__ import annotations

import argparse

import pytest

from vilbert import finetuning, pretraining

REQUIRED = {
    "pretraining": ["--train_data_dir", "d", "--val_data_dir", "d"],
    "finetuning": ["--tasks", "3"],
}
PARSERS = {"pretraining": pretraining, "finetuning": finetuning}


@pytest.mark.parametrize("script", sorted(PARSERS))
@pytest.mark.parametrize(
    ("text", "value"), [("False", False), ("false", False), ("0", False), ("True", True)]
)
def test_do_lower_case_parses_as_a_boolean(script, text, value):
    args = PARSERS[script].parse_args([*REQUIRED[script], "--do_lower_case", text])
    assert args.do_lower_case is value


def test_in_memory_parses_as_a_boolean():
    assert finetuning.parse_args([*REQUIRED["finetuning"], "--in_memory", "False"]).in_memory is False
    assert finetuning.parse_args([*REQUIRED["finetuning"], "--in_memory"]).in_memory is True


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_has_help_and_the_recipe_defaults_to_published(script):
    parser = PARSERS[script].build_parser()
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert silent == []
    assert PARSERS[script].parse_args(REQUIRED[script]).recipe == "published"


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("finetuning", ["--tasks", "3-3"], "names a task twice"),
        ("finetuning", ["--tasks", "3", "--save_every_steps", "-1"], "must be >= 0"),
        ("pretraining", [*REQUIRED["pretraining"], "--gradient_accumulation_steps", "0"], "positive integer"),
        ("pretraining", [*REQUIRED["pretraining"], "--warmup_proportion", "1.5"], "must be in [0, 1)"),
    ],
)
def test_bad_flag_values_name_the_flag(script, argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        PARSERS[script].parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_booleans_refuse_other_words():
    from vilbert.training_args import str_to_bool

    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'maybe'"):
        str_to_bool("maybe")
