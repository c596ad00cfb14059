"""Tasks are data: one TaskSpec per task (spec.py), rows from a data source (sources/), split into
a held-fixed eval set and a seeded demonstration draw (split.py)."""

from icl_scale.tasks.spec import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "TaskSpec", "get_task"]
