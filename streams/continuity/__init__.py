"""One pure continuity engine for every gap: `ContinuityEngine` (engine.py), its per-symbol lines
(lines.py) and the typed outputs its caller carries out (outputs.py)."""

from streams.continuity.engine import ContinuityEngine, Rule
from streams.continuity.lines import UNCONFIRMED, Seed, Settings
from streams.continuity.outputs import Drop, FetchTrades, GapClosed, Output, Publish, Reject

__all__ = [
    "UNCONFIRMED",
    "ContinuityEngine",
    "Drop",
    "FetchTrades",
    "GapClosed",
    "Output",
    "Publish",
    "Reject",
    "Rule",
    "Seed",
    "Settings",
]
