"""Algorithmic digit tasks: the paper's tasks, extra tasks, batches and the stable split; tasks on a language
model's own tokens (`ctxtune.tasks.lm`, built on demand).

Importing this package registers every task; look them up with :func:`get_task`.
"""

from ctxtune.tasks.base import (
    MAX_DISTINCT,
    REJECT_PROBABILITY,
    Batch,
    Task,
    count_distinct,
    get_task,
    is_task,
    list_task_families,
    list_tasks,
    register_task,
    register_task_family,
)
from ctxtune.tasks.digits import (
    PAPER_TASKS,
    Add1,
    Add2,
    Ascending,
    AscendingAdd1,
    Descending,
    DoubleHist,
    DoubleHistRasp,
    Mixture,
)
from ctxtune.tasks.extra import EXTRA_TASKS, Copy, Histogram, Induction, ModSum, Reverse
from ctxtune.tasks.split import (
    SPLITS,
    check_split,
    in_split_torch,
    split_bucket,
    split_bucket_torch,
    split_of,
    stable_hash,
    stable_hash_torch,
)

__all__ = [
    "EXTRA_TASKS",
    "MAX_DISTINCT",
    "PAPER_TASKS",
    "REJECT_PROBABILITY",
    "SPLITS",
    "Add1",
    "Add2",
    "Ascending",
    "AscendingAdd1",
    "Batch",
    "Copy",
    "Descending",
    "DoubleHist",
    "DoubleHistRasp",
    "Histogram",
    "Induction",
    "Mixture",
    "ModSum",
    "Reverse",
    "Task",
    "check_split",
    "count_distinct",
    "get_task",
    "in_split_torch",
    "is_task",
    "list_task_families",
    "list_tasks",
    "register_task",
    "register_task_family",
    "split_bucket",
    "split_bucket_torch",
    "split_of",
    "stable_hash",
    "stable_hash_torch",
]
