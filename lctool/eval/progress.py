"""Progress reporting for evaluation stages, independent of any terminal library."""

from __future__ import annotations


class Tracker:
    """Receives progress: `start` a stage of `total` tokens, then `advance` by tokens done.

    The base class ignores everything; the CLI passes one that draws a rich progress bar.
    """

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, tokens: int) -> None:
        pass


SILENT = Tracker()
