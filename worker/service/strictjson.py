"""JSON as RFC 8259 (and I-JSON, RFC 7493) defines it: what a client may send and what is stored.

Python's ``json`` module accepts more than JSON: ``NaN``, ``Infinity``, numbers that overflow to
``inf`` (``1e999``), ``\\ud800`` escapes that decode to lone surrogates, and duplicate names. A
value like that can be stored, but then neither a job view nor a callback can be serialised, so
one request broke a tenant's (and the admin's) job list for good. The rule is therefore: parse
strictly at the door (:func:`loads_strict`, :func:`check_value`), and show what older versions
stored anyway without failing (:func:`json_safe`).

Control characters in client strings (an ``external_id`` with ANSI escapes) forge log lines and
break reports a LIMS prints: :func:`control_characters` names them so that the caller refuses.

Stdlib only: the API and the workers both import it.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

__all__ = [
    "MAX_SAFE_INTEGER",
    "StrictJSONError",
    "check_value",
    "control_characters",
    "json_safe",
    "loads_strict",
]

# I-JSON (RFC 7493 §2.2): integers a receiver's IEEE 754 double holds exactly.
MAX_SAFE_INTEGER = 2**53 - 1
# Whitespace a free-text value (a note in metadata) may keep; every other control character is refused.
TEXT_WHITESPACE = frozenset("\t\n\r")


class StrictJSONError(ValueError):
    """The text or value is not interoperable JSON; the message says what, in one line."""


def _constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"the number {text[:40]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text) > 20:  # longer than any safe integer: refused before int() builds it
        raise StrictJSONError(f"the integer {text[:40]}… is out of range (at most ±{MAX_SAFE_INTEGER})")
    value = int(text)
    if abs(value) > MAX_SAFE_INTEGER:
        raise StrictJSONError(f"the integer {text} is out of range (at most ±{MAX_SAFE_INTEGER})")
    return value


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise StrictJSONError(f"the name {name[:40]!r} appears twice in one object")
        obj[name] = value
    return obj


def loads_strict(text: str | bytes) -> Any:
    """Parse JSON text, refusing what RFC 8259 / I-JSON do not allow (StrictJSONError) and text
    that is not JSON at all (ValueError, json.JSONDecodeError)."""
    try:
        value = json.loads(
            text,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
            object_pairs_hook=_unique_names,
        )
    except RecursionError:
        raise StrictJSONError("the JSON value is nested too deeply") from None
    check_value(value)  # strings: no lone surrogate (the parser decodes \ud800 without complaint)
    return value


def _check_string(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StrictJSONError(f"{where} holds a lone surrogate (\\ud800-\\udfff), not Unicode text") from None


def check_value(value: Any, where: str = "the value") -> None:
    """Refuse a parsed value that cannot be written back as interoperable JSON: a non-finite or
    out-of-range number, a lone surrogate in a string or a name, a non-string name."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_string(item, where)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if abs(item) > MAX_SAFE_INTEGER:
                raise StrictJSONError(f"an integer in {where} is out of range (at most ±{MAX_SAFE_INTEGER})")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise StrictJSONError(f"{where} holds {item!r}, which is not a JSON number")
        elif isinstance(item, dict):
            for name, child in item.items():
                if not isinstance(name, str):
                    raise StrictJSONError(f"{where} has a name that is not a string")
                _check_string(name, where)
                stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)
        else:
            raise StrictJSONError(f"{where} holds a {type(item).__name__}, which JSON has not")


def control_characters(value: Any, *, text_whitespace: bool = False) -> str | None:
    """The first control character (C0, DEL, C1) in a string or in any string or name inside a
    JSON value, as ``U+XXXX``; None when there is none. ``text_whitespace`` lets tab, newline and
    carriage return through (free text in metadata)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            for char in item:
                if unicodedata.category(char) == "Cc" and not (text_whitespace and char in TEXT_WHITESPACE):
                    return f"U+{ord(char):04X}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def json_safe(value: Any) -> Any:
    """A copy of a stored value that serialises as JSON whatever an older version let in: a lone
    surrogate becomes U+FFFD, a non-finite number null. Interoperable values come back equal."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # through UTF-16: a pair of surrogates becomes its character, a lone one U+FFFD
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
