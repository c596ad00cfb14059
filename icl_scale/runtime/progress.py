"""The main process talks (one rich progress display); the others work and log to their own file."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def console() -> Console:
    """stderr; wide enough for the summary table when it is not a terminal (logs, CI)."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class Clock:
    """Wall time per phase (load, plan, finetune, evaluate, report), summed over jobs."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.started = time.time()

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t


class Progress:
    def __init__(self, state, run_dir: Path, clock: Clock | None = None):
        self.main = state.is_main_process
        self.clock = clock or Clock()
        self.console = console()
        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(logs / f"rank{state.process_index}.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger = logging.getLogger("icl_scale")
        logger.setLevel(logging.INFO)
        logger.addHandler(self.handler)
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                disable=not self.main) if self.main else None
        self.task = None

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()
        logging.getLogger("icl_scale").removeHandler(self.handler)
        self.handler.close()

    def start(self, name: str, total: int, done: int) -> None:
        if self.bar:
            self.task = self.bar.add_task(f"rank 0 · {name}", total=total, completed=done)

    def advance(self, n: int = 1) -> None:
        if self.bar and self.task is not None:
            self.bar.advance(self.task, n)
