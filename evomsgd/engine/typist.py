"""Typing like a person: how long WhatsApp shows "typing..." before a text goes.

Pure. A text that arrives the instant it was "written", at any length, is a bot's; a person's
typing time grows with the text and is never quite the same twice. Bounded, because Evolution
holds the send's HTTP request open for the whole delay (shared/evolution-api.md "Typing delay").
"""

from __future__ import annotations

import random

MIN_DELAY = 1.0  # seconds of "typing..." for the shortest text
MAX_DELAY = 8.0  # never longer, whatever the length (the request stays open meanwhile)
PER_CHAR = 0.05  # seconds per character: 20 a second, a brisk typist
JITTER = 0.2  # +-20%


def typing_delay(text: str, rng: random.Random) -> float:
    """Seconds of "typing..." before `text`: grows with its length, jittered, within
    [MIN_DELAY * (1 - JITTER), MAX_DELAY]."""
    base = min(MAX_DELAY, MIN_DELAY + len(text) * PER_CHAR)
    return min(MAX_DELAY, base * rng.uniform(1.0 - JITTER, 1.0 + JITTER))
