"""Tables as Markdown (GitHub's pipe tables), for docs/BENCHMARKS.md and papers' notes: `dusa
report --format md` and `dusa bench … --format md`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pipe_table(
    title: str | None, header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] = (), below: Sequence[str] = ()
) -> str:
    """`title` in bold above the table, `below` (notes, ratios) after it; `right`: the columns
    whose figures align right."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(" ".join(cell.split()).replace("|", "\\|") for cell in cells) + " |"

    aligned = [*right, *[False] * (len(header) - len(right))]
    lines = [f"**{title}**", ""] if title else []
    lines += [line(header), "|" + "|".join("---:" if r else "---" for r in aligned) + "|"]
    lines += [line(row) for row in rows]
    lines += ["", *below] if below else []
    return "\n".join(lines) + "\n"


def rich_to_markdown(table: Any) -> str:
    """A rich Table (a benchmark's) as a pipe table: its title, headers, cells and caption."""
    def plain(value: Any) -> str:
        return getattr(value, "plain", str(value))

    columns = table.columns
    rows = [[plain(cell) for cell in row] for row in zip(*(column.cells for column in columns))]
    return pipe_table(
        plain(table.title) if table.title else None,
        [plain(column.header) for column in columns],
        rows,
        right=[column.justify == "right" for column in columns],
        below=[plain(table.caption)] if table.caption else [],
    )
