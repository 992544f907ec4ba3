"""What the operator sees while sia-gen runs: images per batch, images/s and an ETA.

Workers report ``(tag, images, phase)`` after every sampled batch to a tiny Ray actor
(:class:`ProgressBoard`, no CPU reserved); the driver polls it and feeds :class:`ProgressView`,
which draws a tqdm bar on a terminal and otherwise logs one line every ``interval`` seconds.
No image bytes go through the driver.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("sia_pipeline.gen.progress")


class ProgressBoard:
    """Per task submission (``tag``): images sampled so far and the phase it is in.

    ``phase`` is ``sample`` (the sampler runs) or ``upload`` (a spilled shard is
    being stored again without sampling). A tag on the board has started; the runner
    uses that to charge an actor's death only to the tasks that were running.
    """

    def __init__(self) -> None:
        self.state: dict[str, tuple[int, str]] = {}

    def report(self, tag: str, images: int, phase: str) -> None:
        self.state[tag] = (images, phase)

    def snapshot(self) -> dict[str, tuple[int, str]]:
        return dict(self.state)

    def forget(self, tags: list[str]) -> None:
        for tag in tags:
            self.state.pop(tag, None)


class BoardSink:
    """The callable a worker gets: fire-and-forget reports to a :class:`ProgressBoard` actor."""

    def __init__(self, board: Any) -> None:
        self.board = board

    def __call__(self, tag: str, images: int, phase: str) -> None:
        self.board.report.remote(tag, images, phase)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressView:
    """A bar on a terminal, else one log line every ``interval`` seconds (and at start/end).

    Args:
        total: images this run samples.
        shards: shards this run writes.
        bar: draw a tqdm bar (only honoured when stderr is a terminal).
        interval: seconds between log lines when there is no bar.
    """

    def __init__(self, total: int, shards: int, bar: bool = True, interval: float = 10.0) -> None:
        self.total, self.shards = total, shards
        self.interval = max(0.1, interval)
        self.images = 0
        self.shards_done = 0
        self.started = False
        self.actors = (0, 0)  # (ready, asked for) until the first one is ready
        self._t0 = time.perf_counter()
        self._last_log = self._t0
        self._bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", desc="sia-gen", dynamic_ncols=True)
        else:
            log.info("sampling %d images in %d shards", total, shards)

    def start_clock(self) -> None:
        """Rates count from here (the first actor ready), not from starting Ray."""
        self.started = True
        self._t0 = self._last_log = time.perf_counter()
        if self._bar is not None:
            self._bar.reset(total=self.total)

    def waiting(self, ready: int, asked: int) -> None:
        """Before the first actor is ready: say so every ``interval`` (models are loading)."""
        self.actors = (ready, asked)
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.set_postfix_str(f"starting actors {ready}/{asked}")
        elif now - self._last_log >= self.interval:
            self._last_log = now
            log.info("%s", self.line())

    def line(self) -> str:
        """``120/512 images (23%), 4.1 images/s, ETA 1m35s, shards 3/16``."""
        if not self.started:
            ready, asked = self.actors
            return f"starting sampling actors (loading the model): {ready}/{asked} ready"
        dt = time.perf_counter() - self._t0
        rate = self.images / dt if dt > 0 else 0.0
        pct = 100.0 * self.images / self.total if self.total else 100.0
        eta = _duration((self.total - self.images) / rate) if rate > 0 else "?"
        return (
            f"{self.images}/{self.total} images ({pct:.0f}%), {rate:.1f} images/s,"
            f" ETA {eta}, shards {self.shards_done}/{self.shards}"
        )

    def update(self, images: int, shards_done: int) -> None:
        """Set the counts (images may go back when a task is charged and redone)."""
        images = max(0, min(images, self.total))
        self.shards_done = shards_done
        if self._bar is not None:
            self._bar.update(images - self.images)
            self._bar.set_postfix_str(f"shards {shards_done}/{self.shards}", refresh=False)
            self.images = images
            return
        self.images = images
        now = time.perf_counter()
        if now - self._last_log >= self.interval:
            self._last_log = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            log.info("%s", self.line())
