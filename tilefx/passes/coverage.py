"""CoverageWarning: a transformation the user asked for reached only part of the model, or none.

A pruning recipe that leaves layers dense, or a ``compile`` that lowers nothing, still returns a
correct model, so it is not an error; but it is not what was asked, and an INFO line nobody sees
let the README's own example leave every ResNet-50 layer dense. So tilefx warns with
:func:`warnings.warn` rather than logging: Python prints each distinct warning by default (in a
script, a notebook or a test run), ``pytest.warns`` can assert it, a CI can make it an error
(``-W error::tilefx.CoverageWarning``) and a user who means it can silence it
(``warnings.filterwarnings("ignore", category=tilefx.CoverageWarning)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

__all__ = ["CoverageWarning", "warn_coverage"]

_NAMED_PER_REASON = 3


class CoverageWarning(UserWarning):
    """A requested transformation applied to only part of the model, or to nothing."""


def warn_coverage(subject: str, total: int, what: str, left: Sequence[tuple[str, str]], fix: str) -> None:
    """Warn that ``subject`` left ``len(left)`` of ``total`` items (``what``) undone, reasons grouped.

    ``left`` holds (reason, item) pairs; items sharing a reason are counted together and the
    first few named: "PruneBlocksPass(block=(16, 1)): 41 of 53 weight layers left dense: 41
    because block (16, 1) does not divide their output channels (conv1.weight 45x64, ...)".
    Nothing is warned when ``left`` is empty.
    """
    if not left:
        return
    groups: dict[str, list[str]] = {}
    for reason, item in left:
        groups.setdefault(reason, []).append(item)
    parts = []
    for reason, items in sorted(groups.items(), key=lambda group: -len(group[1])):
        named = ", ".join(items[:_NAMED_PER_REASON])
        more = len(items) - _NAMED_PER_REASON
        parts.append(f"{len(items)} because {reason} ({named}{f', and {more} more' if more > 0 else ''})")
    message = f"{subject}: {len(left)} of {total} {what}: {'; '.join(parts)}. {fix}"
    warnings.warn(message, CoverageWarning, stacklevel=3)
