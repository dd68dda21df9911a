"""Text from the application, made safe to show on a terminal.

Thread names, pool names and source paths come from the application, and a thread may
name itself anything, terminal escapes included. What poolscope writes to a terminal or
a log shows their control characters as escapes (``\\x1b``) instead of sending them.
"""

from __future__ import annotations

VISIBLE = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{ord(c): f"\\{n}" for c, n in (("\t", "t"), ("\n", "n"), ("\r", "r"))},
    # Bidirectional overrides and line separators: they reorder or break a terminal line.
    **{c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
                                   *range(0x2066, 0x206A))},
    **{c: f"\\u{c:04x}" for c in range(0xD800, 0xE000)},  # lone surrogates cannot be written
}  # fmt: skip
"""Characters a value may not carry onto a terminal, and how they are written instead."""


def visible(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x1b``), for a terminal."""
    return text if text.isprintable() else text.translate(VISIBLE)
