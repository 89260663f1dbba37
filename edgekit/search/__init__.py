"""``edgekit search``: the fastest recipe that passes the accuracy gate, found automatically.

space.py (what may change, one table per model kind), trial.py (one recipe through the real stages, in a
worker, with shared stage artifacts), runners.py (a local worker process, or Ray actors), driver.py (the Optuna
study), run.py (inputs, resume, the final choice and run folder), report.py (trials.jsonl, the report, the
Pareto plot), config.py (the options).
"""

from edgekit.search.config import SearchConfig
from edgekit.search.report import SearchReport
from edgekit.search.run import search

__all__ = ["search", "SearchConfig", "SearchReport"]
