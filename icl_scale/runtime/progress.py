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

from icl_scale import atomic, records


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
    """The main process shows an overall bar (examples of all ranks, jobs done by every rank, ETA)
    and the bar of its current job. Every rank writes its counts to <run>/progress/r<rank>.json,
    which the main process sums (at most once a second)."""

    def __init__(self, state, run_dir: Path, clock: Clock | None = None, total: int = 0, jobs: int = 0,
                 trackers=None):
        self.main, self.rank, self.world = state.is_main_process, state.process_index, state.num_processes
        self.clock = clock or Clock()
        self.trackers = trackers   # runtime/tracking.py: None unless output.trackers
        self.console = console()
        self.dir = Path(run_dir) / "progress"
        self.dir.mkdir(parents=True, exist_ok=True)
        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(logs / f"rank{state.process_index}.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger = logging.getLogger("icl_scale")
        logger.setLevel(logging.INFO)
        logger.addHandler(self.handler)
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console) if self.main else None
        self.jobs, self.done, self.jobs_done, self.last_sync = jobs, 0, 0, 0.0
        self.overall = self.bar.add_task(self._describe(0), total=total) if self.bar else None
        self.task = None

    def _describe(self, jobs_done: int) -> str:
        return f"all {self.world} ranks · jobs {jobs_done}/{self.jobs}"

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        self._sync(force=True)
        if self.bar:
            self.bar.stop()
        logging.getLogger("icl_scale").removeHandler(self.handler)
        self.handler.close()

    def _sync(self, force: bool = False) -> None:
        if not force and time.time() - self.last_sync < 1.0:
            return
        self.last_sync = time.time()
        atomic.write_json(self.dir / f"r{self.rank}.json", {"done": self.done, "jobs_done": self.jobs_done}, indent=None)
        if self.bar:
            counts = [records.repairable(self.dir / f"r{r}.json", "progress file") or {"done": 0, "jobs_done": 0}
                      for r in range(self.world)]   # none yet: that rank has not started
            self.bar.update(self.overall, completed=sum(c["done"] for c in counts),
                            description=self._describe(min(c["jobs_done"] for c in counts)))

    def start(self, name: str, total: int, done: int) -> None:
        self.done += done
        if self.bar:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"rank 0 · {name}", total=total, completed=done)
        self._sync()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar and self.task is not None:
            self.bar.advance(self.task, n)
        self._sync()

    def job_done(self) -> None:
        self.jobs_done += 1
        self._sync(force=True)

    def failed(self, message: str) -> None:
        if self.bar:
            self.console.print(f"[red]job failed[/red] {message}")
