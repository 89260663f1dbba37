"""The terminal form of each report: its sections (``Report.sections_of``, the same ones ``to_markdown`` writes)
drawn by :func:`edgekit.reports.to_rich`. Only the CLI imports this module, after the work is done."""

from __future__ import annotations

from edgekit.reports import fmt_num as _num  # noqa: F401  (the name earlier callers imported)
from edgekit.reports import to_rich


def _each(sections) -> list:
    return [to_rich([s]) for s in sections]


def export_table(r: dict):
    from edgekit.runtimes.export import ExportReport

    return to_rich(ExportReport.sections_of(r))


def quantize_table(r: dict):
    from edgekit.compress.quantize import QuantizeReport

    return to_rich(QuantizeReport.sections_of(r))


def prune_tables(r: dict) -> list:
    """The totals, then the per-layer table (a caller may show the first alone)."""
    from edgekit.compress.prune import PruneReport

    return _each(PruneReport.sections_of(r))


def verify_tables(r: dict) -> list:
    from edgekit.verify import VerifyReport

    return _each(VerifyReport.sections_of(r))


def bench_table(r: dict, wide: bool = False):
    """The latency table: by default the columns that fit 80 columns; ``wide``: every column."""
    from edgekit.benchmarks.bench import BenchReport
    from edgekit.benchmarks.decode import DecodeBenchReport, is_decode_report

    kind = DecodeBenchReport if is_decode_report(r) else BenchReport
    return to_rich([s for s in kind.sections_of(r, wide=wide) if s.key == "latency"])


def device_table(r: dict):
    """GPU phases and memory, and Jetson board figures, per variant; None when the report has none."""
    from edgekit.benchmarks.bench import BenchReport

    sections = [s for s in BenchReport.sections_of(r) if s.key == "device"]
    return to_rich(sections) if sections else None


def environment_line(env: dict) -> str:
    from edgekit.benchmarks.bench import machine_line

    return machine_line(env)
