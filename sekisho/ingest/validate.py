"""Validation of the loaded raw tables against the policy, in SQL (one scan per check kind).

Each check is a small named unit returning ``Problem``s with the file, the line (the
record's line in the file: header is line 1, so line = rowid + 2) and the column.
Messages never quote the offending value (it may be personal data); the line and column
are enough for the steward to find it in their own export.
"""

from __future__ import annotations

from sekisho.ingest.errors import Problem
from sekisho.ingest.reading import SourceFile
from sekisho.policy import Policy, SourceColumn

CODE_PATTERN = r"[0-9A-Za-z_\-]+"
INTEGER_PATTERN = r"-?\d{1,18}"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def column_checks(col: SourceColumn) -> list[tuple[str, str]]:
    """(SQL condition that is TRUE for a bad value, message) for one column."""
    c = _ident(col.name)
    checks: list[tuple[str, str]] = []
    if col.required:
        checks.append((f"{c} IS NULL", "required value is empty / 必須項目が空です"))
    if col.type == "code":
        checks.append((f"{c} IS NOT NULL AND NOT regexp_full_match({c}, '{CODE_PATTERN}')",
                       "not a code (letters, digits, - and _ only)"))
        if col.length:
            checks.append((f"{c} IS NOT NULL AND length({c}) <> {col.length}",
                           f"code must have exactly {col.length} characters"))
    elif col.type == "date":
        checks.append((f"{c} IS NOT NULL AND (length({c}) <> 10 "
                       f"OR try_strptime({c}, '%Y-%m-%d') IS NULL)",
                       "not a date in YYYY-MM-DD form / 日付(YYYY-MM-DD)ではありません"))
    elif col.type == "integer":
        checks.append((f"{c} IS NOT NULL AND NOT regexp_full_match({c}, '{INTEGER_PATTERN}')",
                       "not an integer / 整数ではありません"))
    elif col.type == "decimal":
        checks.append((f"{c} IS NOT NULL AND TRY_CAST({c} AS DOUBLE) IS NULL",
                       "not a number / 数値ではありません"))
    if col.domain:
        allowed = ", ".join(_lit(v) for v in col.domain)
        checks.append((f"{c} IS NOT NULL AND {c} NOT IN ({allowed})",
                       f"value is not one of the allowed codes ({', '.join(col.domain)})"))
    return checks


def check_values(con, sf: SourceFile) -> list[Problem]:
    """Types, required values, lengths and domains: one scan of the table."""
    src = sf.source
    items = [(col.name, cond, msg) for col in src.columns.values() for cond, msg in column_checks(col)]
    if not items:
        return []
    select = ", ".join(f"count(*) FILTER (WHERE {cond}), min(rowid) FILTER (WHERE {cond})"
                       for _, cond, _ in items)
    row = con.execute(f"SELECT {select} FROM raw_{src.name}").fetchone()
    problems = []
    for i, (column, _, msg) in enumerate(items):
        count, first = row[2 * i], row[2 * i + 1]
        if count:
            problems.append(Problem(sf.name, int(first) + 2, column, msg, count=int(count)))
    return problems


def check_unique(con, sf: SourceFile) -> list[Problem]:
    src = sf.source
    if not src.unique:
        return []
    key = ", ".join(_ident(c) for c in src.unique)
    # cheap first pass: are there duplicated keys at all?
    dup = con.execute(f"SELECT count(*) FROM (SELECT 1 FROM raw_{src.name} "
                      f"GROUP BY {key} HAVING count(*) > 1)").fetchone()[0]
    if not dup:
        return []
    match = " AND ".join(f"d.{_ident(c)} IS NOT DISTINCT FROM r.{_ident(c)}" for c in src.unique)
    rows = con.execute(f"""
        WITH d AS (SELECT {key} FROM raw_{src.name} GROUP BY {key} HAVING count(*) > 1),
             r AS (SELECT rowid AS rid, {key} FROM raw_{src.name})
        SELECT list(r.rid ORDER BY r.rid)[2] AS second, {dup} AS groups
        FROM r JOIN d ON {match} GROUP BY {", ".join("r." + _ident(c) for c in src.unique)}
        ORDER BY second LIMIT 5""").fetchall()
    if not rows:
        return []
    what = " + ".join(src.unique)
    out = [Problem(sf.name, int(second) + 2, ", ".join(src.unique),
                   f"duplicate {what}: the same key appears on an earlier line / キーが重複しています")
           for second, _ in rows]
    if rows[0][1] > len(rows):
        out.append(Problem(sf.name, None, ", ".join(src.unique),
                           f"{rows[0][1] - len(rows)} more duplicated key(s)"))
    return out


def check_references(con, files: dict[str, SourceFile]) -> list[Problem]:
    """Every non-empty reference must exist in the referenced source."""
    problems = []
    for name, sf in files.items():
        for ref in sf.source.references:
            target = files[ref.source]
            present = " AND ".join(f"r.{_ident(c)} IS NOT NULL" for c in ref.columns)
            match = " AND ".join(f"t.{_ident(tc)} = r.{_ident(c)}"
                                 for c, tc in zip(ref.columns, ref.target))
            count, first = con.execute(f"""
                SELECT count(*), min(r.rowid) FROM raw_{name} r
                WHERE {present} AND NOT EXISTS (SELECT 1 FROM raw_{ref.source} t WHERE {match})
            """).fetchone()
            if count:
                cols = ", ".join(ref.columns)
                problems.append(Problem(
                    sf.name, int(first) + 2, cols,
                    f"refers to a record that is not in {target.name} ({', '.join(ref.target)}) "
                    "/ 参照先がありません", count=int(count)))
    return problems


def validate(con, files: dict[str, SourceFile], policy: Policy) -> list[Problem]:
    problems: list[Problem] = []
    for sf in files.values():
        problems += check_values(con, sf)
        problems += check_unique(con, sf)
    if not problems:  # references are only meaningful between well-formed tables
        problems += check_references(con, files)
    return problems
