"""The `/books` view's pure part: what `?levels=` accepts."""

from __future__ import annotations

import pytest

from tables.books import MAX_LEVELS, levels_asked


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, 20), ("1", 1), ("50", 50), (str(MAX_LEVELS), MAX_LEVELS), ("0", None), ("-1", None), ("x", None),
     ("5001", None), ("", None), ("١٢", None), ("1e3", None)],
)  # fmt: skip
def test_levels_asked(text: str | None, expected: int | None) -> None:
    assert levels_asked(text, 20) == expected
