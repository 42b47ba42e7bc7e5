"""Shared fixtures: paths to the committed test data and the tiny configs."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def repo_root() -> str:
    return ROOT


@pytest.fixture
def data_dir() -> str:
    return DATA
