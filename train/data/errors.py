"""The one exception for bad training data, so every message points at the file and line to fix.

Training data comes from many hands (annotation tools, public data sets, technicians confirming
reports). A wrong box in image 1,437 of 1,800 must be found in seconds, so every reader raises
``DataError(path, line, message)`` whose text is ``path:line: message`` — the form editors and
terminals turn into a link. ``line`` is a 1-based line number for text formats, a JSON path
(``annotations[12].bbox``) or an XML element path (``object[2]/bndbox/xmax``) for structured ones,
and ``None`` for problems of the file as a whole (then the text is ``path: message``).
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad training data at ``path`` (and ``line``, when the problem has one)."""

    def __init__(self, path: str | Path, line: int | str | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"

    def __reduce__(self):  # keep pickling (multiprocessing data loaders) working
        return (type(self), (self.path, self.line, self.message))
