"""Typed, versioned reports: JSON for machines (``--json`` prints the same object), tables for people.

Each report describes itself once, as a list of :class:`Section` values built from its dict form
(``Report.sections_of``); :func:`to_markdown` and :func:`to_rich` render that one description, so the
Markdown report and the terminal table cannot disagree. Cells are plain, already formatted strings.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1

# Verdicts a cell, a note or a title can carry: green / bold red / yellow in the terminal, marked in Markdown.
PASS, FAIL, WARN = "pass", "fail", "warn"


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


# ---- the description -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """A table cell or a sentence under a table: its text, and the verdict it states, if any."""

    text: str
    status: str | None = None  # PASS, FAIL or WARN


def _as_cell(v) -> Cell:
    return v if isinstance(v, Cell) else Cell("-" if v is None else str(v))


@dataclass(frozen=True)
class Section:
    """One titled table with the sentences under it. Any part may be empty: a heading alone, notes alone.

    ``rows`` and ``notes`` take strings or :class:`Cell` values (``None`` reads ``-``); they are stored as
    tuples of ``Cell``. ``align`` holds one letter per column, ``l`` for text (it may wrap) and ``r`` for
    figures (never split); by default the first column is text and the others figures.
    """

    title: str | None = None
    headers: tuple = ()
    rows: tuple = ()
    notes: tuple = ()
    align: str = ""
    status: str | None = None  # the verdict the title announces
    level: int = 2  # Markdown heading level
    key: str = ""  # names the part, for a caller that shows one part alone (``bench_table``)
    collapsed: bool = False  # Markdown: folded into <details>, for long secondary tables

    def __post_init__(self):
        put = object.__setattr__  # frozen: normalise once, here
        put(self, "headers", tuple(self.headers))
        put(self, "rows", tuple(tuple(_as_cell(v) for v in row) for row in self.rows))
        put(self, "notes", tuple(_as_cell(n) for n in self.notes))
        if not self.align and self.headers:
            put(self, "align", "l" + "r" * (len(self.headers) - 1))
        if len(self.align) != len(self.headers) or any(len(r) != len(self.headers) for r in self.rows):
            raise ValueError(f"section {self.title!r}: every row and the alignment need {len(self.headers)} cells")

    def column(self, header: str) -> list[str]:
        """The texts of one column (for tests and callers that want one figure)."""
        i = self.headers.index(header)
        return [r[i].text for r in self.rows]


def drop_empty_columns(headers: list[str], rows: list[list[str]], keep: int = 1) -> tuple[list, list]:
    """Leave out the columns (after the first ``keep``) in which no row has a value: no column of dashes."""
    used = [i for i in range(len(headers)) if i < keep or any(_as_cell(r[i]).text != "-" for r in rows)]
    return [headers[i] for i in used], [[r[i] for i in used] for r in rows]


# ---- Markdown ----------------------------------------------------------------------------------------

_MD_MARK = {PASS: "✅ {}", FAIL: "❌ **{}**", WARN: "⚠️ {}"}


def _md(c: Cell, in_table: bool = True) -> str:
    text = c.text.replace("|", "\\|") if in_table else c.text
    return _MD_MARK[c.status].format(text) if c.status else text


def md_table(headers: list[str], rows: list[list], align: str = "") -> str:
    def cell(v):
        if isinstance(v, Cell):
            return _md(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in (align or "l" * len(headers)))
    lines = ["| " + " | ".join(headers) + " |", rule]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(sections) -> str:
    """Sections as Markdown: a heading per title, a table, then the notes as paragraphs (warnings quoted)."""
    parts = []
    for s in sections:
        block = [md_table(list(s.headers), s.rows, s.align)] if s.headers else []
        block += [("> " if n.status == WARN else "") + _md(n, in_table=False) for n in s.notes]
        if s.collapsed:
            parts.append(f"<details><summary>{s.title or ''}</summary>\n\n" + "\n\n".join(block) + "\n\n</details>")
            continue
        if s.title:
            parts.append("#" * s.level + " " + s.title)
        parts += block
    return "\n\n".join(parts)


# ---- terminal (rich, imported only when drawn) -------------------------------------------------------

_STYLE = {PASS: "green", FAIL: "bold red", WARN: "yellow", None: ""}
TEXT_FOLD = 24

def _lines(words: list[str], width: int) -> int:
    n, used = 1, -1
    for w in words:
        if used + 1 + len(w) > width and used >= 0:
            n, used = n + 1, -1
        used += 1 + len(w)
    return n


def _header_width(header: str, max_lines: int) -> int:
    """The narrowest width at which ``header`` wraps onto at most ``max_lines`` lines."""
    words = header.split()
    if not words:
        return 0
    w = max(map(len, words))
    while _lines(words, w) > max_lines:
        w += 1
    return w


def column_widths(s: Section, width: int) -> list[int] | None:
    """Widths that fit the table into ``width`` columns cutting no figure and no word, or None when the
    table fits as it is (or cannot fit at all, and rich's own folding is the best there is).

    rich shrinks the widest columns first, which cuts figures (``9.5…``) while a long name still has room
    to wrap; here figures keep their full width, headers may take two lines, and text columns wrap.
    """
    n = len(s.headers)
    room = width - 3 * n - 1  # a border and a space either side of every column, and the last border
    texts = [[s.headers[i]] + [r[i].text for r in s.rows] for i in range(n)]
    widest = [max(len(t) for t in col) for col in texts]
    if sum(widest) <= room:
        return None
    for header_lines in (2, 3, 99):
        low = []
        for i, col in enumerate(texts):
            cells = col[1:]
            if s.align[i] == "r":
                need = max((len(t) for t in cells), default=0)
            else:  # a word longer than TEXT_FOLD (a path) is folded rather than given the whole table
                need = min(max((len(w) for t in cells for w in t.split()), default=0), TEXT_FOLD)
            low.append(max(need, _header_width(col[0], header_lines), 1))
        if sum(low) <= room:
            break
    else:
        return None
    spare = room - sum(low)
    for side in "lr":  # text columns first: one line per row reads better than one line per header
        for i in range(n):
            if s.align[i] == side and spare > 0:
                grow = min(spare, widest[i] - low[i])
                low[i] += grow
                spare -= grow
    return low


class _RichSections:
    """A rich renderable; the column widths are chosen when the console's width is known."""

    def __init__(self, sections):
        self.sections = list(sections)

    def __rich_console__(self, console, options):
        from rich.table import Table
        from rich.text import Text

        for s in self.sections:
            title = Text(s.title, style=_STYLE[s.status]) if s.title else None
            if s.headers:
                widths = column_widths(s, options.max_width)
                t = Table(title=title)
                for i, h in enumerate(s.headers):
                    t.add_column(h, justify="right" if s.align[i] == "r" else "left", overflow="fold",
                                 width=widths[i] if widths else None)
                for row in s.rows:
                    t.add_row(*(Text(c.text, style=_STYLE[c.status]) for c in row))
                yield t
            elif title is not None:
                yield Text.assemble(title, style="bold")
            for note in s.notes:
                plain = re.sub(r"`([^`]*)`", r"\1", note.text)  # Markdown code spans read as plain text here
                # One unbroken line, so that a log grep finds the whole warning (print with crop=False).
                if note.status == WARN:
                    yield Text("Warning: " + plain, style=_STYLE[WARN], no_wrap=True, overflow="ignore")
                else:
                    yield Text(plain, style=_STYLE[note.status])


def to_rich(sections) -> _RichSections:
    """Sections as one rich renderable (``console.print(to_rich(report.sections()))``)."""
    return _RichSections(sections)


# ---- the report mixin and shared cell formats --------------------------------------------------------


class Report:
    """Mixin for report dataclasses: the JSON form (``--json`` prints the same object)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)  # type: ignore[arg-type]
        return _clean({"kind": type(self).__name__, **d})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


class RenderedReport(Report, abc.ABC):
    """A report people read too: its sections are the one description Markdown and the terminal are drawn from.

    A subclass without ``sections_of`` cannot be instantiated (reports that are only JSON, such as a release's,
    derive from ``Report``).
    """

    @staticmethod
    @abc.abstractmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        """The report's tables and sentences, from its dict form (``to_dict()``, or a ``--json`` file)."""

    def sections(self, wide: bool = False) -> list[Section]:
        return self.sections_of(self.to_dict(), wide=wide)

    def to_markdown(self, wide: bool = True) -> str:
        """Markdown has no terminal width to fit, so it carries every column unless told otherwise."""
        return to_markdown(self.sections(wide=wide))


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def fmt_mib(n: int | None) -> str:
    """Bytes in MiB, for a column headed ``(MiB)``: at most 5 characters below 10 GiB."""
    if n is None:
        return "-"
    x = n / 2**20
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"


def fmt_fixed(v: float | None) -> str:
    """About 4 significant digits in fixed point (0.451, 9.512, 12.35, 123.5, 1235): never an exponent,
    at most 5 characters below 10^5, so a column of latencies stays narrow and reads at a glance."""
    if v is None:
        return "-"
    for limit, digits in ((10, 3), (100, 2), (1000, 1)):
        if abs(v) < limit:
            return f"{v:.{digits}f}"
    return f"{v:.0f}"


def fmt_num(v, digits: int = 4) -> str:
    return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def fmt_ratio(a: float | None, b: float | None) -> str:
    """a / b as ``0.43x``; small ratios keep two significant digits (``0.0037x``, not ``0.00x``)."""
    if a is None or not b:
        return "-"
    r = a / b
    return f"{r:.2f}x" if abs(r) >= 0.1 or r == 0 else f"{r:.2g}x"


# ---- JUnit XML, for CI reporters (verify --junit, compress --junit, gate --junit) ------------------------
# Written with xml.etree, not the junit-xml package, because that package cannot produce a file every reporter
# reads: it always writes a `disabled` attribute (Jenkins' xunit schema junit-10.xsd rejects it), leaves `time`
# out of a test case that took 0 s (dorny/test-reporter then computes NaN), and writes the suite's time as a raw
# float sum (17 digits, which that schema also refuses). What is written here:
# - <testsuites> (name, tests, failures, errors, time) holding one <testsuite> (the same, plus skipped): only
#   the attributes junit-10.xsd declares;
# - `time` on every <testcase>, in seconds to the millisecond ("0.000" for an instant check);
# - a failure's explanation in `message` and as the <failure> body (GitLab shows the body);
# - a check that could not be made as <skipped message="..."/>; the check's figures in <system-out>.

JUNIT_TIME_DECIMALS = 3


@dataclass
class JunitCase:
    name: str
    classname: str
    seconds: float = 0.0  # the check's own duration; 0 for an instant comparison
    failure: str | None = None  # why the check failed (the message, and the first line of the body)
    failure_detail: str | None = None  # the rest of the body (the figures)
    skipped: str | None = None  # why the check could not be made
    output: str | None = None  # the check's figures, for <system-out>


def junit_time(seconds: float | None) -> str:
    """Seconds as junit-10.xsd's SUREFIRE_TIME accepts them: not negative, a fixed number of decimals."""
    return f"{max(float(seconds or 0.0), 0.0):.{JUNIT_TIME_DECIMALS}f}"


def junit_xml(suite: str, cases: list[JunitCase], properties: dict | None = None,
              seconds: float | None = None) -> str:
    """The document of one suite of ``cases``; ``seconds``: the suite's time (default: the sum of the cases')."""
    import xml.etree.ElementTree as ET

    if seconds is None:
        seconds = sum(round(c.seconds or 0.0, JUNIT_TIME_DECIMALS) for c in cases)
    counts = {"tests": str(len(cases)), "failures": str(sum(c.failure is not None for c in cases)), "errors": "0"}
    skipped = sum(c.failure is None and c.skipped is not None for c in cases)
    root = ET.Element("testsuites", {"name": suite, **counts, "time": junit_time(seconds)})
    ts = ET.SubElement(root, "testsuite", {"name": suite, **counts, "skipped": str(skipped), "time": junit_time(seconds)})
    if properties:
        props = ET.SubElement(ts, "properties")
        for k, v in properties.items():
            ET.SubElement(props, "property", {"name": str(k), "value": "" if v is None else str(v)})
    for c in cases:
        tc = ET.SubElement(ts, "testcase", {"name": c.name, "classname": c.classname, "time": junit_time(c.seconds)})
        if c.failure is not None:
            ET.SubElement(tc, "failure", {"message": c.failure, "type": "threshold"}).text = (
                c.failure + (f"\n{c.failure_detail}" if c.failure_detail else ""))
        elif c.skipped is not None:
            ET.SubElement(tc, "skipped", {"message": c.skipped})
        if c.output:
            ET.SubElement(tc, "system-out").text = c.output
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path, suite: str, cases: list[JunitCase], properties: dict | None = None,
                seconds: float | None = None) -> None:
    """Write :func:`junit_xml` completely or not at all."""
    from edgekit.artifacts import write_text_atomic

    write_text_atomic(path, junit_xml(suite, cases, properties, seconds))
