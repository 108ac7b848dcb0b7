"""Text that must stay on one line: header values, log lines, replies and their parts."""

from __future__ import annotations

import re

# Control characters (the line separators Unicode adds too: NEL, LS, PS), with the blanks
# around them.
_CONTROLS = re.compile(r"[ \t]*[\x00-\x1f\x7f\x85\u2028\u2029]+[ \t]*")


def one_line(text: str) -> str:
    """`text` with each run of control characters (line breaks, tabs, NUL ...) and the
    blanks around it made one space, and stripped: it can neither start a new header or
    reply line (no header injection, R-5) nor carry what PostgreSQL or a log line cannot
    hold, and a folded line reads as one."""
    return _CONTROLS.sub(" ", text).strip()
