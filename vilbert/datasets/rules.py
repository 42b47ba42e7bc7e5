"""Which data rules a dataset follows: the published loaders' (``published``) or corrected ones.

``--recipe published`` (the scripts' default) makes the data path do what the published loaders
did, where this implementation would otherwise correct them; ``--recipe modern`` corrects them.
The four rules (each tested on a hand-made example):

- ITM negatives (pretraining): published draws the mismatched caption from images whose id differs
  from the image's own **once the last character is dropped** (``id[:-1]``), so ids that differ only
  in their last digit are never drawn; corrected: only the image itself is excluded.
- MRM targets under group masking (pretraining): published labels every region whose features are
  all zero after masking, so a region *stored* as zeros is a target without being masked;
  corrected: a target is a region that was masked.
- Flickr30K captions: published adds ``[CLS]``/``[SEP]`` and then cuts to ``max_seq_length``, so a
  long caption loses its ``[SEP]``; corrected: the caption is cut before ``[SEP]`` is added.
- VCR: published truncates the shared question **in place** while it pairs it with each option in
  turn (later options see the question as earlier ones left it) and draws each person's name
  independently (names may repeat); corrected: each option is truncated on its own and the names
  of a question are distinct. Both are seeded by (seed, question), so a question always reads alike.

The library's datasets default to the corrected rules; the scripts pass ``--recipe``.
"""

from __future__ import annotations

from typing import Literal, get_args

DataRules = Literal["published", "modern"]
DATA_RULES: tuple[str, ...] = get_args(DataRules)


def check_rules(rules: str) -> str:
    if rules not in DATA_RULES:
        raise ValueError(f"unknown data rules {rules!r}; choose one of {', '.join(DATA_RULES)}")
    return rules
