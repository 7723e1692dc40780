"""What the commands share to read their arguments and to say what they did."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_WAIT", "POLL", "pid_list", "plural", "seconds"]

#: Seconds ``--wait`` waits when given no value.
DEFAULT_WAIT = 30.0
#: Seconds between two looks while waiting.
POLL = 0.1


def seconds(text: str) -> float:
    """Parse a number of seconds >= 0 (an argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return value


def plural(count: int, word: str) -> str:
    if count == 1:
        return f"{count} {word}"
    return f"{count} {word}es" if word.endswith("s") else f"{count} {word}s"


def pid_list(numbers: list[int]) -> str:
    return ", ".join(str(pid) for pid in numbers)
