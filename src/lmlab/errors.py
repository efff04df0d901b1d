"""The one exception type for a user's mistake.

The CLI prints an `LmlabError` as a short paragraph and exits non-zero; anything
else is a bug in lmlab and keeps its traceback.
"""

from __future__ import annotations

import difflib


class LmlabError(Exception):
    """A problem the user can fix: bad input, a missing file, a wrong config key."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A hint naming the closest valid choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""
