"""A1111's prompt emphasis: ``(word)`` x1.1, ``((word))`` x1.21, ``[word]`` /1.1, ``(word:1.5)``, ``\\(`` literal,
and ``BREAK``, which starts a new 75-token chunk (see :mod:`prompt_chunks`).

Each token's text-encoder output is scaled by its weight, then the whole is rescaled to keep its
mean (A1111's method). Written here because compel, the library for this, re-implements text
encoding around diffusers pipelines rather than offering the parser alone.
"""

from __future__ import annotations

import math
import re

from difftool.core.errors import ParameterError

#: A1111's grammar, tokenised: escapes, brackets, ``:weight)`` and plain text.
_TOKEN = re.compile(r"\\[\\()\[\]]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
UP, DOWN = 1.1, 1 / 1.1
#: ``BREAK`` between words (A1111: capitals, a word of its own) and the weight that marks it in :func:`parse`.
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
BREAK_WEIGHT = -1.0


def parse(prompt: str) -> list[tuple[str, float]]:
    """``"a (red:1.5) [car]"`` -> ``[("a ", 1.0), ("red", 1.5), ("car", 0.909...)]`` (adjacent equal weights merged).

    Each ``BREAK`` is an item of its own, ``("BREAK", BREAK_WEIGHT)``.
    """
    _check_text(prompt)
    out: list[tuple[str, float]] = []
    # Where each open group starts in ``out``; round and square groups nest independently, as in A1111.
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(out)):
            out[i] = (out[i][0], out[i][1] * factor)

    for match in _TOKEN.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\"):
            out.append((text[1:], 1.0))
        elif text == "(":
            round_open.append(len(out))
        elif text == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            scale(round_open.pop(), _weight(weight, prompt))
        elif text == ")" and round_open:
            scale(round_open.pop(), UP)
        elif text == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:
            for index, part in enumerate(_BREAK.split(text)):
                if index:
                    out.append(("BREAK", BREAK_WEIGHT))
                out.append((part, 1.0))
    for start in round_open:  # unclosed brackets still apply, as in A1111
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)
    merged: list[tuple[str, float]] = []
    for text, weight in out:
        if merged and merged[-1][1] == weight and weight != BREAK_WEIGHT:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def _weight(text: str, prompt: str) -> float:
    """The number in ``(word:WEIGHT)``; ``(word:.)`` or ``(word:1.2.3)`` is the user's typo, said in one line."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise ParameterError(
            f"prompt weight {text!r} in {shown!r} is not a number",
            r"write (word:1.2) with one number, or \( and \) for literal brackets",
        )
    return value


def _check_text(prompt: str) -> None:
    """A prompt read from bytes that are not UTF-8 (a command line in another encoding) holds lone
    surrogates (Python's ``surrogateescape``), which no tokenizer takes: refused here, in one line."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParameterError(
            f"a prompt holds bytes that are not UTF-8 text (at character {exc.start})",
            "pass the prompt as UTF-8 (check the terminal's or the file's encoding)",
        ) from None
