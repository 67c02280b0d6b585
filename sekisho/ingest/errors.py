"""Ingest failures: every problem names the file, the line and the column."""

from __future__ import annotations

from dataclasses import dataclass

from sekisho.errors import SekishoError


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None          # 1-based line in the source file (1 = header); None: the whole file
    column: str | None
    message: str              # never contains a raw value from the file
    count: int = 1            # how many rows share this problem (the line is the first)

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        if self.column:
            where += f" [{self.column}]"
        more = f" ({self.count} rows; first shown)" if self.count > 1 else ""
        return f"{where}: {self.message}{more}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "column": self.column,
                "message": self.message, "count": self.count}


class IngestError(SekishoError):
    """The upload was refused; nothing was changed. ``problems`` lists what is wrong."""

    def __init__(self, problems: list[Problem] | Problem, *, summary: str | None = None):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        self.summary = summary or f"{len(self.problems)} problem(s) in the upload"
        shown = self.problems[:20]
        lines = [self.summary + " / 取込を中止しました(ストアは変更されていません):"]
        lines += [f"  {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        super().__init__("\n".join(lines))


class IngestRefused(SekishoError):
    """The caller may not ingest (not a steward)."""
