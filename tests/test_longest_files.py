"""`make test` starts the longest files first (tests/conftest.py): a name there that matches no file
would silently fall back to the default order."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import LONGEST_FILES


def test_every_file_listed_as_longest_exists() -> None:
    here = Path(__file__).parent
    assert [name for name in LONGEST_FILES if not (here / name).is_file()] == []
