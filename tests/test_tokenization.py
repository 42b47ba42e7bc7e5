"""The fast tokenizer equals BERT's slow Python reference on awkward strings."""

from __future__ import annotations

import pytest
import transformers

from vilbert.tokenization import BertTokenizer, default_vocab_path

STRINGS = [
    "A man riding a horse on the beach.",
    "Héllo Wörld, naïve café — résumé!",
    "Two dogs (brown & white) play: fetch; tug-of-war?",
    "北京欢迎你 and 東京",
    "supercalifragilisticexpialidocious unaffable",
    "x" * 101 + " ok",
    "  tabs\tand\nnewlines\r\n  and   spaces  ",
    "don't stop-believing... 3.14 $100 #tag @user",
    "\u00a0non\u200bbreaking\u3000space",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
    "",
]


@pytest.fixture(scope="module")
def tokenizers_pair():
    vocab = default_vocab_path()
    return BertTokenizer(vocab), transformers.BertTokenizer(vocab, do_lower_case=True)


@pytest.mark.parametrize("text", STRINGS)
def test_matches_reference_tokenizer(tokenizers_pair, text):
    ours, reference = tokenizers_pair
    assert ours.tokenize(text) == reference.tokenize(text)
    assert ours.encode(text) == reference.convert_tokens_to_ids(reference.tokenize(text))


def test_special_tokens_and_size(tokenizers_pair):
    ours, _ = tokenizers_pair
    assert ours.vocab_size == 30522
    assert (
        ours.pad_token_id,
        ours.unk_token_id,
        ours.cls_token_id,
        ours.sep_token_id,
        ours.mask_token_id,
    ) == (0, 100, 101, 102, 103)
    assert ours.convert_ids_to_tokens(ours.convert_tokens_to_ids(["[CLS]", "dog", "[SEP]"])) == [
        "[CLS]",
        "dog",
        "[SEP]",
    ]


def test_directory_or_file(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog", "##s", "a"]) + "\n")
    by_dir, by_file = BertTokenizer(str(tmp_path)), BertTokenizer(str(vocab))
    assert by_dir.tokenize("A dogs") == by_file.tokenize("A dogs") == ["a", "dog", "##s"]


def test_missing_vocab_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        BertTokenizer(str(tmp_path))


def test_vocab_without_specials_is_clear(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"lacks the special token \[PAD\]"):
        BertTokenizer(str(tmp_path))
