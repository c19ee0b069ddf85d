"""Reading JSONL files line by line, with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.exceptions import DataError


def jsonl_values(path: Path, *, unit: str = "line", start: int = 1) -> Iterator[tuple[int, Any]]:
    """(number, value) of each non-blank line of ``path``, numbered from ``start``.

    Raises:
        DataError: "<path>, <unit> <number>: not valid JSON (...)" for a line that is not JSON.
    """
    with Path(path).open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=start):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, {unit} {number}: not valid JSON ({exc.msg} at column "
                                f"{exc.colno})") from None
