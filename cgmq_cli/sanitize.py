"""The one output sanitiser: nothing from a file, a flag or a model reaches the terminal raw.

Profile names, paths, layer names, data specs and messages of user code can
hold control characters (an ``ESC[31m`` that recolours the terminal, a
newline that splits a one-line error) or bidirectional marks (U+202E turns
``txt.exe`` into ``exe.txt`` on screen). :func:`clean` escapes them; the
renderers (:mod:`cgmq_cli.render`, :mod:`cgmq_cli.report`) apply it at the
output boundary. :func:`short` is the one way an error message echoes a value
it was given: repr-style escaping, cut to a bounded length.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

# C0 controls (newline and tab included), DEL, C1 controls, the Arabic letter mark, LRM/RLM,
# the line/paragraph separators, the bidi embeddings/overrides/isolates and the BOM.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group(0)
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: Any) -> str:
    """``text`` as a string with every control character and bidi mark escaped (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, str(text))


def clean_tree(obj: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with :func:`clean` applied to every string."""
    if isinstance(obj, str):
        return clean(obj)
    if isinstance(obj, dict):
        return {clean_tree(k): clean_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clean_tree(v) for v in obj)
    return obj


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def short(value: Any, limit: int = 60) -> str:
    """A bounded, escaped, repr-like form of ``value`` for an error message.

    Strings are quoted and escaped like ``repr``; containers show their first
    few items; anything longer than ``limit`` characters is cut with ``...``.
    Never walks a whole structure (a YAML alias bomb stays cheap).
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not break an error message
        text = f"<{type(value).__name__}>"
    text = clean(text)
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def cut(text: Any, limit: int = 60) -> str:
    """``text`` escaped like :func:`clean`, at most ``limit`` characters (no quotes: for names in messages).

    A longer text keeps its start and its end (a path keeps its file name): ``/very/lo...ther/net.py``.
    """
    text = clean(text)
    if len(text) <= limit:
        return text
    head = max((limit - 3) // 2, 1)
    return text[:head] + "..." + text[-max(limit - 3 - head, 1):]
