"""Routing-health report of a workdir (python -m moex.report; see __main__.py).

read: workdir files and record helpers; capacity: drop at any capacity factor and the
recommendation; figures: the PNGs; page: report.md.
"""

from moex.report.capacity import current_cf, recommend
from moex.report.page import summary, write_report
from moex.report.read import (
  Run,
  by_layer,
  dead_count,
  dead_experts,
  last,
  latest_train,
  load_run,
  nan_reduce,
  num,
  read_jsonl,
  series,
  split,
)

__all__ = ["Run", "by_layer", "current_cf", "dead_count", "dead_experts", "last",
           "latest_train", "load_run", "nan_reduce", "num", "read_jsonl", "recommend",
           "series", "split", "summary", "write_report"]
