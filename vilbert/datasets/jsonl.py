"""JSON-lines annotation files (Flickr30K ``.jsonline``, VCR ``.jsonl``), read with line-exact errors."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from vilbert.errors import BadInputError


class JSONLinesError(BadInputError):
    """A line of a JSON-lines file that is not a JSON object."""


class AnnotationError(BadInputError):
    """An annotation file or hard-negative pool whose content is not what the task expects."""


def read_jsonl_records(path: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-empty line of ``path``, the number 1-based.

    Blank lines are skipped, so a record's index does not name its line: readers that check the
    content of each record keep the number to word their errors as ``path:line: ...``.
    A line that is not a JSON object is an error naming file and line.
    """
    records: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JSONLinesError(f"{path}:{lineno}: malformed JSON line: {err}") from None
            if not isinstance(record, dict):
                raise JSONLinesError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    return records


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All objects of ``path``, one per non-empty line; a bad line is an error naming file and line."""
    return [record for _, record in read_jsonl_records(path)]


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Write one JSON object per line; returns the number of lines written."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    return count
