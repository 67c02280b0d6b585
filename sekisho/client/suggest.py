"""A way forward for a refused query: a concrete rewrite where one exists (issue 19).

``suggest(refusal, views)`` reads the refused SQL (``GuardRefusal.sql``, set by the ibis
backend), the refusal's code and part, and the analyst's views (names, columns, classes,
public domains), and returns a :class:`Suggestion`: a short Japanese sentence, and where
the guard accepts an equivalent or a close, coarser query, that query (and the
``execute`` arguments to run it with). ``rewrite_idioms`` turns the common conditional
aggregate idioms ibis and pandas users write (``COUNT(*) FILTER (WHERE c)``,
``SUM(CAST(c AS INT))``, ``SUM(x) FILTER (WHERE c)``) into the conditional forms of the
guard's language (``COUNT(CASE WHEN c THEN 1 END)``, ``SUM(CASE WHEN c THEN x END)``),
which the guard protects like ``WHERE c`` (docs/guard-language.md).

Everything here is client-side text processing of the analyst's own query and the
views' public description: it decides nothing (the guard checks the rewrite like any
query) and reads no data.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import sqlglot
from sqlglot import exp

from sekisho.guard.idioms import as_case_form   # the guard's own rewrite: one definition

DIALECT = "duckdb"

# finer -> coarser columns (a result too large for the guard's cell limit)
COARSER = {"age": "age_band", "chome_code": "block", "chome_name": "block", "mesh250m": "mesh500m",
           "mesh500m": "mesh1km", "birth_ym": "birth_year", "idou_ym": "idou_year", "cert_ym": "cert_type"}
DEFAULT_DP_EPSILON = 0.1

HINTS_JA = {
    "function_not_allowed": "使える関数は docs/guard-language.md にあります。文字列の加工は CASE・LIKE・IN で書き換えてください。",
    "measure_in_filter": "金額などの測定値では絞り込めません。年齢階級・地域などの区分で絞り込むか、区分ごとに集計してください。",
    "measure_arithmetic": "測定値は列のまま SUM / AVG してください（計算は集計の後に行えます）。",
    "privacy_unit_in_filter": "個人・世帯の識別子では絞り込めません。人数は COUNT(DISTINCT person_id) で数えてください。",
    "subquery_in_expression": "IN (SELECT …) の代わりに、公開ビュー（areas など）との JOIN か値の一覧 IN ('a', 'b') を使ってください。",
    "personal_join": "個人データのビュー同士は結合できません。それぞれ集計してから、集計結果同士を結合してください。",
    "join_fan_out": "一人が複数行を持つビューは、年月・年度などの列を WHERE で一つの値に固定して結合してください（例: tax_year = 2025）。",
    "distinct_rows": "重複を除いた人数は COUNT(DISTINCT person_id) で数えてください。",
    "window_below_boundary": "ウィンドウ関数は集計した結果に対して使ってください（副問合せで先に集計）。",
    "limit_below_boundary": "ORDER BY / LIMIT は集計した結果に対して使ってください。",
    "filter_population_below_k": "条件に当てはまる人が少なすぎます。地域（町丁目→地域ブロック）や年齢の範囲を広げてください。",
    "condition_influence_below_k": "この条件で数える人がほとんど変わりません。条件を外すか、範囲を広げてください。",
    "paused_for_review": "管理者の確認が終わるまで照会できません。管理者に連絡してください。",
    "resource_limit": "条件や区分を減らすか、粗い区分（年齢→年齢階級、町丁目→地域ブロック）にしてください。",
    "guard_busy": "しばらくしてから、もう一度実行してください。",
    "no_data": "データ管理者がデータを取り込むまでお待ちください。",
    "execution_failed": "列の型（文字列か数値か）と値を確かめてください。",
    "type_mismatch": "文字列は文字列と、数値は数値と比べてください（例: age >= 65, block = '灘'）。",
    "too_complex": "問合せを分けて、集計した結果を組み合わせてください。",
}


@dataclass(frozen=True)
class Suggestion:
    text: str                                   # what to do (Japanese)
    sql: str | None = None                      # a rewritten query, where one exists
    kwargs: dict[str, Any] = field(default_factory=dict)   # execute(...) arguments for it

    def call(self) -> str | None:
        """How to run it in the kernel (``con`` is the connection)."""
        if self.sql is None and not self.kwargs:
            return None
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        if self.sql is None:
            return f"（同じ式で）.execute({args.lstrip(', ')})"
        return f'con.sql("""{self.sql}""").execute({args.lstrip(", ")})'


# ---- idioms -----------------------------------------------------------------------------------

def rewrite_idioms(sql: str) -> str | None:
    """``sql`` with conditional-aggregate idioms in the guard's conditional forms, or None
    when there is nothing to rewrite (or the SQL does not parse)."""
    try:
        tree = sqlglot.parse_one(sql, read=DIALECT)
    except Exception:
        return None
    before = tree.sql(dialect=DIALECT)
    after = tree.transform(as_case_form).sql(dialect=DIALECT)
    return after if after != before else None


# ---- per refusal code -------------------------------------------------------------------------

def _parse(sql: str | None) -> exp.Expression | None:
    if not sql:
        return None
    try:
        return sqlglot.parse_one(sql, read=DIALECT)
    except Exception:
        return None


def _views_in(tree: exp.Expression, views: dict[str, Any]) -> list[str]:
    return [t.name for t in tree.find_all(exp.Table) if t.name in views]


def _columns_of(view: str, views: dict[str, Any]) -> dict[str, Any]:
    spec = views.get(view) or {}
    return spec.get("columns", {}) if isinstance(spec, dict) else {}


def _group_dimension(view: str, views: dict[str, Any]) -> str | None:
    columns = _columns_of(view, views)
    for preferred in ("block", "sex", "age_band", "tax_year", "idou_type", "cert_type", "facility_type"):
        if preferred in columns:
            return preferred
    for name, spec in columns.items():
        if isinstance(spec, dict) and spec.get("class") == "dimension" and spec.get("domain"):
            return name
    return None


def _sql(tree: exp.Expression) -> str:
    return tree.sql(dialect=DIALECT)


def _row_level(tree: exp.Expression, views: dict[str, Any]) -> Suggestion:
    names = _views_in(tree, views)
    dim = _group_dimension(names[0], views) if names else None
    text = "個票（1 人 1 行）は出力できません。区分ごとに人数や合計を集計してください。"
    if not names or dim is None:
        return Suggestion(text)
    where = tree.args.get("where") if isinstance(tree, exp.Select) else None
    from_ = tree.args.get("from_") if isinstance(tree, exp.Select) else None
    simple = from_ is not None and isinstance(from_.this, exp.Table) and not tree.args.get("joins")
    rewritten = exp.select(exp.column(dim), exp.alias_(exp.Count(this=exp.Star()), "n")).from_(
        from_.this.copy() if simple else exp.to_table(names[0]))
    if simple and where is not None:
        rewritten = rewritten.where(where.this.copy())
    rewritten = rewritten.group_by(exp.column(dim)).order_by(exp.column(dim))
    return Suggestion(text, _sql(rewritten))


def _distribution(tree: exp.Expression, views: dict[str, Any]) -> str | None:
    """``AVG(dimension)`` / ``SUM(dimension)`` -> the distribution: the dimension as a
    group key, counted."""
    if not isinstance(tree, exp.Select):
        return None
    dimensions = {name for view in _views_in(tree, views) for name, spec in _columns_of(view, views).items()
                  if isinstance(spec, dict) and spec.get("class") == "dimension"}
    for node in tree.find_all(exp.Avg, exp.Sum):
        if isinstance(node.this, exp.Column) and node.this.name in dimensions:
            column = node.this.name
            tree = tree.copy()
            target = next(n for n in tree.find_all(exp.Avg, exp.Sum)
                          if isinstance(n.this, exp.Column) and n.this.name == column)
            parent = target.parent
            count = exp.Count(this=exp.Star())
            if isinstance(parent, exp.Alias):
                parent.replace(exp.alias_(count, "n"))
            else:
                target.replace(count)
            tree.set("expressions", [exp.column(column), *tree.expressions])
            return _sql(tree.group_by(exp.column(column), copy=False))
    return None


def _ungrouped(tree: exp.Expression, part: str | None) -> Suggestion:
    text = "集計しない列は GROUP BY に加えて区分にしてください。"
    if not isinstance(tree, exp.Select) or not part:
        return Suggestion(text)
    target = _parse(part)
    if not isinstance(target, exp.Column):
        return Suggestion(text)
    group = tree.args.get("group")
    existing = [e.sql() for e in group.expressions] if group is not None else []
    if target.sql() in existing:
        return Suggestion(text)
    tree = tree.copy()
    tree = tree.group_by(exp.column(target.name), copy=False)
    return Suggestion(text, _sql(tree))


def _grouping_sets(tree: exp.Expression) -> Suggestion:
    text = ("ROLLUP / CUBE / GROUPING SETS は使えません（合計から秘匿セルを逆算できるため）。"
            "区分ごとの集計と、合計の集計を別々に照会してください。")
    if not isinstance(tree, exp.Select) or tree.args.get("group") is None:
        return Suggestion(text)
    tree = tree.copy()
    group = tree.args["group"]
    columns: list[exp.Expression] = []
    sets = (exp.Rollup, exp.Cube, exp.GroupingSets)
    for item in [*group.expressions, *(x for key in ("rollup", "cube", "grouping_sets")
                                       for x in group.args.get(key) or [])]:
        found = list(item.find_all(exp.Column)) if isinstance(item, sets) else [item]
        for col in found:
            if all(col.sql() != c.sql() for c in columns):
                columns.append(col.copy())
    tree.set("group", exp.Group(expressions=columns))
    return Suggestion(text, _sql(tree))


def _privacy_unit_count(tree: exp.Expression, views: dict[str, Any]) -> Suggestion:
    text = "個人・世帯の識別子は COUNT(DISTINCT …) で数えるときだけ使えます。"
    identifiers = {name for view in views for name, spec in _columns_of(view, views).items()
                   if isinstance(spec, dict) and spec.get("class") in ("privacy_unit", "linkage")}

    def fix(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Count) and isinstance(node.this, exp.Column) and node.this.name in identifiers:
            return exp.Count(this=exp.Distinct(expressions=[node.this.copy()]))
        return node

    after = tree.copy().transform(fix)
    return Suggestion(text, _sql(after)) if _sql(after) != _sql(tree) else Suggestion(text)


def _coarser(tree: exp.Expression, views: dict[str, Any]) -> Suggestion:
    text = "区分の組み合わせが多すぎます。粗い区分（年齢→年齢階級、町丁目→地域ブロック）にしてください。"
    available = {name for view in _views_in(tree, views) for name in _columns_of(view, views)}
    changed = False

    def fix(node: exp.Expression) -> exp.Expression:
        nonlocal changed
        if isinstance(node, exp.Column) and node.name in COARSER and COARSER[node.name] in available:
            changed = True
            return exp.column(COARSER[node.name], table=node.table or None)
        return node

    after = tree.copy().transform(fix)
    return Suggestion(text, _sql(after)) if changed else Suggestion(text)


def _unknown_name(tree: exp.Expression, part: str | None, views: dict[str, Any], *, view: bool) -> Suggestion:
    candidates = sorted(views) if view else sorted({c for v in (_views_in(tree, views) or views)
                                                    for c in _columns_of(v, views)})
    wrong = None
    if part:
        quoted = re.search(r"'([^']+)'", part)   # the engine's "Column 'x' could not be resolved"
        parsed = None if quoted else _parse(part)
        wrong = quoted.group(1) if quoted else parsed.name if isinstance(parsed, (exp.Column, exp.Table)) \
            else part.strip('"')
    what = "ビュー" if view else "列"
    if not wrong:
        return Suggestion(f"その{what}はありません。con.list_tables() や con.views で名前を確かめてください。")
    close = difflib.get_close_matches(wrong, candidates, n=1, cutoff=0.5)
    if not close:
        return Suggestion(f"{what}「{wrong}」はありません。con.list_tables() や con.views で名前を確かめてください。")
    node_type = exp.Table if view else exp.Column

    def fix(node: exp.Expression) -> exp.Expression:
        if isinstance(node, node_type) and node.name == wrong:
            new = node.copy()
            new.set("this", exp.to_identifier(close[0]))
            return new
        return node

    return Suggestion(f"{what}「{wrong}」はありません。「{close[0]}」のことですか。", _sql(tree.copy().transform(fix)))


def _fan_out(tree: exp.Expression, views: dict[str, Any]) -> Suggestion:
    """Name the columns that, fixed in WHERE, leave one row per person of each joined view
    with several rows (the policy's ``unique_per_person``, as ``views`` describes it)."""
    parts = []
    for view in dict.fromkeys(_views_in(tree, views)):
        spec = views.get(view) or {}
        declared = spec.get("unique_per_person") if isinstance(spec, dict) else None
        if not declared:
            continue
        columns = _columns_of(view, views)
        named = "・".join(f"{(columns.get(c) or {}).get('description') or c}（{c}）" for c in declared)
        parts.append(f"{view} は {named}")
    if not parts:
        return Suggestion(HINTS_JA["join_fan_out"])
    return Suggestion(f"{'、'.join(parts)}を、それぞれ WHERE で一つの値に固定してください"
                      "（区分の列は GROUP BY の区分にしても構いません）。一人一行になり、結合して集計できます。")


def _drop_condition(tree: exp.Expression, part: str | None, text: str) -> Suggestion:
    """The query without the condition ``part`` (or, without a part, its last WHERE conjunct)."""
    if not isinstance(tree, exp.Select):
        return Suggestion(text)
    tree = tree.copy()
    for select in tree.find_all(exp.Select):
        where = select.args.get("where")
        if where is None:
            continue
        conjuncts = list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]
        target = None
        if part:
            wanted = re.sub(r"\s+", " ", part).strip().lower()
            target = next((c for c in conjuncts if _sql(c).lower() == wanted), None)
        elif conjuncts:
            target = conjuncts[-1]
        if target is None:
            continue
        rest = [c for c in conjuncts if c is not target]
        select.set("where", exp.Where(this=exp.and_(*rest)) if rest else None)
        return Suggestion(text, _sql(tree))
    return Suggestion(text)


def suggest(refusal: Any, views: dict[str, Any] | None = None,
            budget: dict[str, Any] | None = None) -> Suggestion | None:
    """A way forward for ``refusal`` (a ``GuardRefusal`` with ``code``, ``part`` and, from
    the ibis backend, ``sql``, ``mode``, ``epsilon``)."""
    code = getattr(refusal, "code", None)
    sql = getattr(refusal, "sql", None)
    part = getattr(refusal, "part", None)
    views = views or {}
    tree = _parse(sql)
    if code in ("aggregate_filter", "aggregate_argument_not_allowed"):
        rewritten = rewrite_idioms(sql) if sql else None
        if rewritten:
            return Suggestion("条件付きの件数・合計は CASE 式で書けます（WHERE の条件と同じように保護されます）。",
                              rewritten, _mode_kwargs(refusal))
        if code == "aggregate_filter":
            return Suggestion("FILTER 句の代わりに COUNT(CASE WHEN 条件 THEN 1 END) と書いてください。")
        distribution = _distribution(tree, views) if tree is not None else None
        if distribution is not None:
            return Suggestion("属性の列（年齢など）は合計・平均できません。その列を区分にした人数の分布なら集計できます"
                              "（平均はこの分布から計算できます）。", distribution, _mode_kwargs(refusal))
        return Suggestion("属性の列（年齢など）は合計・平均できません。GROUP BY の区分にして人数を数えてください"
                          "（例: SELECT age_band, COUNT(*) AS n FROM residents GROUP BY age_band）。")
    if code == "epsilon_invalid":
        cap = (budget or {}).get("epsilon_per_query_max")
        eps = DEFAULT_DP_EPSILON if cap is None else min(DEFAULT_DP_EPSILON, float(cap))
        limit = f"（1 回の上限は ε = {cap:g}）" if isinstance(cap, (int, float)) else ""
        return Suggestion(f"差分プライバシー方式では ε を指定してください{limit}。小さいほど安全で、ノイズは大きくなります。",
                          sql, {"mode": "dp", "epsilon": eps})
    if code == "budget_exhausted":
        return Suggestion("今期の予算が残っていません。しきい値方式（mode=\"threshold\"）で照会するか、来期までお待ちください。",
                          sql, {"mode": "threshold"})
    if code == "mode_not_allowed":
        return Suggestion("この役割で使える方式で照会してください。", sql, {})
    if tree is None:
        return Suggestion(HINTS_JA[code]) if code in HINTS_JA else None
    if code == "row_level_output":
        return _row_level(tree, views)
    if code == "ungrouped_column":
        return _ungrouped(tree, part)
    if code == "grouping_sets":
        return _grouping_sets(tree)
    if code == "privacy_unit_in_expression":
        return _privacy_unit_count(tree, views)
    if code in ("result_too_large", "resource_limit"):
        s = _coarser(tree, views)
        return s if s.sql else Suggestion(HINTS_JA.get(code, s.text))
    if code in ("unknown_column", "unknown_view"):
        return _unknown_name(tree, part, views, view=code == "unknown_view")
    if code == "join_fan_out":
        return _fan_out(tree, views)
    if code == "condition_influence_below_k":
        return _drop_condition(tree, part, HINTS_JA[code])
    if code == "filter_population_below_k":
        return _drop_condition(tree, None, HINTS_JA[code])
    return Suggestion(HINTS_JA[code]) if code in HINTS_JA else None


def _mode_kwargs(refusal: Any) -> dict[str, Any]:
    out = {}
    if getattr(refusal, "mode", None):
        out["mode"] = refusal.mode
    if getattr(refusal, "epsilon", None) is not None:
        out["epsilon"] = refusal.epsilon
    return out
