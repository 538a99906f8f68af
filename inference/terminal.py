"""Text from users, made safe to print on an operator's terminal.

File names, product names, station names, notes and case ids come from clients (an upload's file name,
a form field) or from folders of seized images. Printed raw, an ESC sequence in one can recolour,
retitle or rewrite the operator's terminal, and a newline can forge a line of output. Every command that
prints such text (`verity refs`, `verity keys`, `verity audit`, `verity predict`, and `verity` itself for
errors) passes it through `terminal_safe` or `terminal_json`.
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 controls (ESC, BEL, newline, carriage return, tab...), DEL, C1 controls (CSI 0x9b starts an escape
# sequence on its own on some terminals), and the bidirectional overrides that make a terminal show a
# name reversed.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: object) -> str:
    """`text` as a string with every control character written as a visible escape (ESC -> \\x1b)."""
    return _UNSAFE.sub(_escaped, str(text))


def terminal_json(value: Any) -> str:
    """json.dumps for printing: it already escapes C0 and (ensure_ascii) every non-ASCII character;
    DEL, which it leaves raw, is escaped too, and the JSON stays valid."""
    return json.dumps(value).replace("\x7f", "\\u007f")


def terminal_lines(text: str) -> str:
    """A report of several lines, each made terminal-safe; only its own line breaks are kept."""
    return "\n".join(terminal_safe(line) for line in text.split("\n"))
