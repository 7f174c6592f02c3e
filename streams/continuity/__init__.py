"""One pure continuity engine for every gap: `ContinuityEngine` (engine.py), its per-symbol trade lines
(lines.py), order book lines (books.py) and the typed outputs its caller carries out (outputs.py)."""

from streams.continuity.books import RESYNC_REASONS, BookSettings
from streams.continuity.engine import ContinuityEngine, Rule
from streams.continuity.lines import UNCONFIRMED, Seed, Settings
from streams.continuity.outputs import (
    BookResync,
    Drop,
    FetchRequest,
    FetchSnapshot,
    FetchTrades,
    GapClosed,
    Output,
    Publish,
    Reject,
    RejectFrame,
)

__all__ = [
    "RESYNC_REASONS",
    "UNCONFIRMED",
    "BookResync",
    "BookSettings",
    "ContinuityEngine",
    "Drop",
    "FetchRequest",
    "FetchSnapshot",
    "FetchTrades",
    "GapClosed",
    "Output",
    "Publish",
    "Reject",
    "RejectFrame",
    "Rule",
    "Seed",
    "Settings",
]
