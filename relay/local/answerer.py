"""A small, deterministic on-phone answerer for simple spoken questions.

It understands a closed set of question shapes, from the transcript hint
(``Request.text``) alone:

- arithmetic: "what is 12 times 7", "3.5 + 4 * 2", "100 divided by 8",
  "15 percent of 80", "square root of 81", "7 squared" (digits or number
  words up to the millions, "two point five");
- unit conversions: km and miles, kg and pounds, °C and °F ("convert 10 km
  to miles", "how many pounds is 70 kg", "20 degrees in fahrenheit");
- the calendar: "what day is it", "what's the date", "what day is
  tomorrow", "what time is it", "what year is it";
- spelling: "how do you spell necessary".

Anything else is not understood (``None``): an open question is for the
cloud. Pure and synchronous; the time is passed in.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable
from typing import Final

from relay.local.phone import long_date

__all__ = [
    "MAX_MAGNITUDE",
    "MAX_OPERANDS",
    "MAX_QUESTION_CHARS",
    "MAX_SPELL_LETTERS",
    "Solver",
    "solve",
    "understand",
]

MAX_QUESTION_CHARS: Final = 200
"""Longer texts are not simple questions: not understood."""
MAX_OPERANDS: Final = 8
"""Arithmetic with more numbers is not understood."""
MAX_MAGNITUDE: Final = 1e15
"""Operands or results beyond this (in absolute value) are not understood."""
MAX_SPELL_LETTERS: Final = 30
"""Longer words are not spelled."""

Solver = Callable[[datetime.datetime], str]
"""An understood question: gives the answer text for the local time now."""

# --- normalisation -----------------------------------------------------------

_ONES: Final = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS: Final = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALES: Final = {"thousand": 1_000, "million": 1_000_000}
_POLITE: Final = re.compile(
    r"^(?:(?:hey|ok|okay|so|please|can you tell me|could you tell me|tell me|"
    r"do you know)\s+)+|(?:\s+please)+$"
)
_DIGIT_COMMA: Final = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TENS_HYPHEN: Final = re.compile(
    r"\b(" + "|".join(_TENS) + r")-(one|two|three|four|five|six|seven|eight|nine)\b"
)


def _clean(text: str) -> str:
    """Lower case, apostrophes and punctuation folded, polite words dropped."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"\bwhat(?:'s|s)\b", "what is", text).replace("'", "")
    text = _DIGIT_COMMA.sub("", text)
    text = re.sub(r"[?!,;:\"]", " ", text)
    text = " ".join(text.split()).strip(" .")
    return _POLITE.sub("", text).strip()


def _number_words(text: str) -> str:
    """Runs of number words replaced by digits ("twenty one" -> "21")."""
    words = _TENS_HYPHEN.sub(r"\1 \2", text).split(" ")
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] not in _ONES and words[i] not in _TENS and words[i] != "a":
            out.append(words[i])
            i += 1
            continue
        total, current, j, seen = 0, 0, i, False
        while j < len(words):
            word = words[j]
            if word in _ONES or word in _TENS:
                current += _ONES.get(word, 0) + _TENS.get(word, 0)
            elif word == "a" and j + 1 < len(words) and words[j + 1] == "hundred":
                current += 1
            elif word == "hundred" and seen:
                current *= 100
            elif word in _SCALES and seen:
                total += current * _SCALES[word]
                current = 0
            elif (
                word == "and"
                and seen
                and j + 1 < len(words)
                and (words[j + 1] in _ONES or words[j + 1] in _TENS)
            ):
                pass
            else:
                break
            seen = True
            j += 1
        if not seen or j == i:
            out.append(words[i])
            i += 1
            continue
        number = str(total + current)
        if j + 1 < len(words) and words[j] == "point" and words[j + 1] in _ONES:
            decimals = ""
            j += 1
            while j < len(words) and _ONES.get(words[j], 10) < 10:
                decimals += str(_ONES[words[j]])
                j += 1
            number += "." + decimals
        out.append(number)
        i = j
    return " ".join(out)


def _fmt(value: float) -> str:
    """A number for the display: thousands separated, at most 2 decimals."""
    if value == 0:
        return "0"
    if value == int(value):
        return f"{int(value):,}"
    if abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def _const(text: str) -> Solver:
    return lambda _now: text


# --- calendar and spelling (before number words: "spell one") ----------------

_TAIL: Final = r"(?: right now| now| today)?"
_CALENDAR: Final[tuple[tuple[re.Pattern[str], Solver], ...]] = (
    (
        re.compile(rf"^(?:what|which) (?:day|day of the week) is (?:it|today){_TAIL}$"),
        lambda now: f"It's {now:%A}.",
    ),
    (re.compile(r"^what is today$"), lambda now: f"It's {now:%A}."),
    (
        re.compile(
            rf"^(?:what is (?:the date|todays date|the date today)|what date is it)"
            rf"{_TAIL}$"
        ),
        lambda now: f"Today is {long_date(now.date())}.",
    ),
    (
        re.compile(r"^(?:what day (?:is|will it be) tomorrow|what is tomorrow)$"),
        lambda now: f"Tomorrow is {long_date(now.date() + datetime.timedelta(1))}.",
    ),
    (
        re.compile(r"^(?:what day was (?:it )?yesterday|what was yesterday)$"),
        lambda now: f"Yesterday was {long_date(now.date() - datetime.timedelta(1))}.",
    ),
    (
        re.compile(rf"^(?:what time is it|what is the time){_TAIL}$"),
        lambda now: f"It is {now:%H:%M}.",
    ),
    (re.compile(rf"^what year is it{_TAIL}$"), lambda now: f"It's {now.year}."),
    (re.compile(rf"^what month is it{_TAIL}$"), lambda now: f"It's {now:%B}."),
)

_WORD: Final = (
    rf"([a-z]{{1,{MAX_SPELL_LETTERS}}}(?:['-][a-z]{{1,{MAX_SPELL_LETTERS}}})?)"
)
_SPELL: Final = (
    re.compile(
        rf"^(?:how (?:do you|do i|to|would you) spell|spell|"
        rf"what is the spelling of) (?:the word )?{_WORD}$"
    ),
    re.compile(rf"^how (?:is|do you write) (?:the word )?{_WORD} (?:spelled|spelt)$"),
)


def _spelling(text: str) -> Solver | None:
    for pattern in _SPELL:
        match = pattern.match(text)
        if match:
            word = match.group(1)
            letters = "-".join(c.upper() for c in word if c.isalpha())
            return _const(f"{word.capitalize()}: {letters}.")
    return None


# --- arithmetic --------------------------------------------------------------

_NUM: Final = r"\d{1,16}(?:\.\d{1,8})?"
_OPS: Final = {
    "plus": "+", "+": "+",
    "minus": "-", "-": "-", "\u2212": "-",
    "times": "*", "x": "*", "*": "*", "\u00d7": "*", "multiplied by": "*",
    "divided by": "/", "over": "/", "/": "/", "\u00f7": "/",
}  # fmt: skip
_OP: Final = (
    "(?:" + "|".join(re.escape(op) for op in sorted(_OPS, key=len, reverse=True)) + ")"
)
_ASK: Final = r"(?:(?:what is|how much is|calculate|compute|work out)\s+)?"
_EXPR: Final = re.compile(
    rf"^{_ASK}({_NUM}(?:\s*{_OP}\s*{_NUM}){{1,{MAX_OPERANDS - 1}}})(?:\s*=)?$"
)
_TOKEN: Final = re.compile(rf"{_NUM}|{_OP}")
_PERCENT: Final = re.compile(rf"^{_ASK}({_NUM})\s*(?:%|percent|per cent) of ({_NUM})$")
_ROOT: Final = re.compile(rf"^{_ASK}(?:the )?square root of ({_NUM})$")
_POWER: Final = re.compile(rf"^{_ASK}({_NUM}) (squared|cubed)$")
_SYMBOL: Final = {"+": "+", "-": "\u2212", "*": "\u00d7", "/": "\u00f7"}


def _arithmetic(text: str) -> Solver | None:
    if match := _EXPR.match(text):
        tokens = _TOKEN.findall(match.group(1))
        numbers = [float(t) for t in tokens[::2]]
        ops = [_OPS[t] for t in tokens[1::2]]
        if any(n > MAX_MAGNITUDE for n in numbers):
            return None
        terms = [numbers[0]]
        for op, number in zip(ops, numbers[1:], strict=True):
            if op == "/" and number == 0:
                return _const("You can't divide by zero.")
            if op == "*":
                terms[-1] *= number
            elif op == "/":
                terms[-1] /= number
            else:
                terms.append(number if op == "+" else -number)
        shown = " ".join(
            [_fmt(numbers[0])]
            + [
                f"{_SYMBOL[op]} {_fmt(n)}"
                for op, n in zip(ops, numbers[1:], strict=True)
            ]
        )
        return _result(shown + " =", math.fsum(terms))
    if match := _PERCENT.match(text):
        pct, base = float(match.group(1)), float(match.group(2))
        if max(pct, base) > MAX_MAGNITUDE:
            return None
        return _result(f"{_fmt(pct)}% of {_fmt(base)} is", pct * base / 100)
    if match := _ROOT.match(text):
        value = float(match.group(1))
        if value > MAX_MAGNITUDE:
            return None
        return _result(f"The square root of {_fmt(value)} is", math.sqrt(value))
    if match := _POWER.match(text):
        value = float(match.group(1))
        if value > MAX_MAGNITUDE:
            return None
        power = 2 if match.group(2) == "squared" else 3
        return _result(f"{_fmt(value)} {match.group(2)} is", value**power)
    return None


def _result(prefix: str, value: float) -> Solver | None:
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        return None
    return _const(f"{prefix} {_fmt(value)}.")


# --- unit conversions --------------------------------------------------------

_UNITS: Final = {
    "km": "km", "kms": "km", "kilometer": "km", "kilometers": "km",
    "kilometre": "km", "kilometres": "km",
    "mi": "mi", "mile": "mi", "miles": "mi",
    "kg": "kg", "kgs": "kg", "kilo": "kg", "kilos": "kg", "kilogram": "kg",
    "kilograms": "kg", "kilogramme": "kg", "kilogrammes": "kg",
    "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb",
    "°c": "c", "c": "c", "celsius": "c", "centigrade": "c",
    "degrees celsius": "c", "degree celsius": "c", "degrees c": "c",
    "degrees centigrade": "c",
    "°f": "f", "f": "f", "fahrenheit": "f", "degrees fahrenheit": "f",
    "degree fahrenheit": "f", "degrees f": "f",
    "degrees": "deg", "degree": "deg",
}  # fmt: skip
_UNIT: Final = (
    "(" + "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True)) + ")"
)
_SIGNED: Final = rf"(-?{_NUM})"
_CONVERT: Final = (
    re.compile(
        rf"^(?:(?:convert|what is|how much is)\s+)?{_SIGNED}\s*{_UNIT}\s+"
        rf"(?:in|to|into|as|in to)\s+{_UNIT}$"
    ),
    re.compile(rf"^how many {_UNIT} (?:is|are|in|make) {_SIGNED}\s*{_UNIT}$"),
)
_CONVERSIONS: Final[dict[tuple[str, str], Callable[[float], float]]] = {
    ("km", "mi"): lambda v: v / 1.609344,
    ("mi", "km"): lambda v: v * 1.609344,
    ("kg", "lb"): lambda v: v / 0.45359237,
    ("lb", "kg"): lambda v: v * 0.45359237,
    ("c", "f"): lambda v: v * 9 / 5 + 32,
    ("f", "c"): lambda v: (v - 32) * 5 / 9,
}
_OTHER: Final = {"c": "f", "f": "c"}


def _unit_name(unit: str, value: float) -> str:
    if unit == "mi":
        return "mile" if value == 1 else "miles"
    return {"c": "°C", "f": "°F"}.get(unit, unit)


def _conversion(text: str) -> Solver | None:
    for index, pattern in enumerate(_CONVERT):
        match = pattern.match(text)
        if match is None:
            continue
        if index == 0:
            number, source, target = match.group(1), match.group(2), match.group(3)
        else:
            target, number, source = match.group(1), match.group(2), match.group(3)
        src, dst = _UNITS[source], _UNITS[target]
        if src == "deg":
            src = _OTHER.get(dst, "deg")
        convert = _CONVERSIONS.get((src, dst))
        value = float(number)
        if convert is None or abs(value) > MAX_MAGNITUDE:
            return None
        result = convert(value)
        if not math.isfinite(result) or abs(result) > MAX_MAGNITUDE:
            return None
        return _const(
            f"{_fmt(value)} {_unit_name(src, value)} is "
            f"{_fmt(result)} {_unit_name(dst, result)}."
        )
    return None


# --- entry points ------------------------------------------------------------


def understand(text: str | None) -> Solver | None:
    """Whether ``text`` is a question this answerer knows, and how to answer it.

    Args:
        text: The question (a transcript hint); ``None`` is not understood.

    Returns:
        A function of the local time now giving the answer text, or ``None``
        when the question is not one of the known shapes.
    """
    if text is None or len(text) > MAX_QUESTION_CHARS:
        return None
    clean = _clean(text)
    if not clean:
        return None
    for pattern, calendar in _CALENDAR:
        if pattern.match(clean):
            return calendar
    if spelling := _spelling(clean):
        return spelling
    numeric = _number_words(clean)
    return _arithmetic(numeric) or _conversion(numeric)


def solve(text: str | None, now: datetime.datetime) -> str | None:
    """The answer to a simple question, or ``None`` if not understood.

    Args:
        text: The question.
        now: The local wall-clock time (for calendar questions).

    Returns:
        The answer text, or ``None``.
    """
    solver = understand(text)
    return None if solver is None else solver(now)
