"""Refusals. A refusal names a stable code, a bilingual reason and the offending SQL
part; its text is a function of the query and the policy only, never of the data."""

from __future__ import annotations

from sekisho.errors import SekishoError

# code -> (Japanese, English). Reasons are fixed strings: they never carry values
# computed from the data (no counts, no sums), so a refusal is not a side channel.
REASONS: dict[str, tuple[str, str]] = {
    "unknown_user": ("登録されていない利用者です", "the user is not registered"),
    "role_has_no_views": ("この役割は集計を利用できません", "this role may not query views"),
    "mode_not_allowed": ("この役割では指定の方式を利用できません", "this role may not use the requested mode"),
    "parse_error": ("SQL を解析できません", "the SQL could not be parsed"),
    "empty_query": ("SQL が空です", "the query is empty"),
    "multiple_statements": ("文は一つだけ指定してください", "exactly one statement is allowed"),
    "not_a_select": ("SELECT 文以外は実行できません", "only a single SELECT is allowed"),
    "unknown_view": ("参照できないビューです", "the view does not exist or is not visible to this role"),
    "unknown_column": ("参照できない列です", "the column does not exist or is not visible"),
    "table_function": ("テーブル関数・ファイル読込は使用できません", "table functions and file readers are not allowed"),
    "function_not_allowed": ("使用できない関数です", "this function is not on the allow-list"),
    "syntax_not_allowed": ("使用できない構文です", "this SQL construct is not allowed"),
    "parameter_placeholder": ("パラメータは使用できません", "query parameters are not supported"),
    "recursive_cte": ("再帰 CTE は使用できません", "recursive CTEs are not allowed"),
    "row_level_output": ("個票（行単位）の出力はできません。集計してください",
                         "row-level output is not allowed; aggregate the rows"),
    "subquery_in_expression": ("式の中の副問合せ（IN/EXISTS/スカラー）は使用できません",
                               "subqueries inside expressions (IN, EXISTS, scalar) are not allowed"),
    "set_operation_below_boundary": ("集計前の UNION/INTERSECT/EXCEPT は使用できません",
                                     "UNION/INTERSECT/EXCEPT of row-level data is not allowed"),
    "window_below_boundary": ("集計前・集計時のウィンドウ関数は使用できません",
                              "window functions on row-level data are not allowed"),
    "distinct_rows": ("行単位の DISTINCT は使用できません", "DISTINCT over row-level data is not allowed"),
    "limit_below_boundary": ("集計前の ORDER BY / LIMIT / OFFSET は使用できません",
                             "ORDER BY, LIMIT or OFFSET on row-level data is not allowed"),
    "nested_aggregation": ("個票と集計結果を同じ段で組み合わせることはできません",
                           "row-level data may not be combined with aggregated results in one step"),
    "personal_join": ("個人データのビュー同士は個人ID（person_id 同士）でのみ結合できます。世帯は世帯単位の集計"
                      "（GROUP BY household_id）と household_id で結合してください",
                      "person-level views join only on the person key (person_id = person_id); households "
                      "join as a unit scope (GROUP BY household_id) on household_id"),
    "self_join": ("同じ個人データのビューを自分自身と結合することはできません",
                  "a person-level view may not be joined with itself"),
    "join_fan_out": ("一人が複数行を持つビュー同士の結合、またはその結合での他方の測定値の合計はできません"
                     "（課税年度などを一つに固定してください）",
                     "at most one joined view may give a person several rows, and only its own measures may be "
                     "summed (fix e.g. tax_year to one value)"),
    "semi_join_column": ("EXISTS / IN / SEMI JOIN 側の列は結合条件の中でだけ使用できます",
                         "columns of a SEMI/ANTI-joined (EXISTS, IN) view may only be used in its join condition"),
    "dp_household_linkage": ("差分プライバシー方式では、個人の行に世帯の属性を結合した集計はできません"
                             "（世帯単位の集計を使ってください）",
                             "DP mode cannot release person rows joined to household facts (count households "
                             "with a unit scope instead)"),
    "join_not_allowed": ("この種類の結合は使用できません（個人データを左側に INNER/LEFT JOIN）",
                         "only INNER or LEFT joins with the person-level view on the left are allowed"),
    "privacy_unit_in_filter": ("個人識別子・連結キーは条件・結合・グループ化に使用できません",
                               "the privacy unit and linkage keys may not be used in WHERE, JOIN or GROUP BY"),
    "privacy_unit_in_expression": ("個人識別子・連結キーは COUNT(DISTINCT …) 以外で使用できません",
                                   "the privacy unit and linkage keys may only be counted with COUNT(DISTINCT ...)"),
    "measure_in_filter": ("金額等の測定値は条件・結合・グループ化に使用できません",
                          "measures may not be used in WHERE, JOIN or GROUP BY (they can isolate persons)"),
    "measure_mixed_with_dimension": ("測定値と属性を一つの式で混ぜることはできません",
                                     "an expression may not mix a measure with dimension columns"),
    "aggregate_not_allowed": ("使用できない集計関数です", "this aggregate is not allowed on person-level data"),
    "aggregate_argument_not_allowed": ("この列は集計できません", "this column may not be aggregated this way"),
    "aggregate_filter": ("集計関数の FILTER 句は使用できません", "FILTER clauses on aggregates are not allowed"),
    "grouping_sets": ("ROLLUP/CUBE/GROUPING SETS は使用できません（秘匿セルの逆算防止）",
                      "ROLLUP, CUBE and GROUPING SETS are not allowed (they allow back-calculating suppressed cells)"),
    "ungrouped_column": ("GROUP BY にない列は集計結果に出力できません",
                         "a column outside GROUP BY cannot appear next to aggregates"),
    "unit_scope_not_allowed": ("世帯単位の集計（GROUP BY 連結キー）はこの形では使用できません",
                               "this per-unit (GROUP BY linkage key) step is not of an allowed shape"),
    "unit_scope_nested": ("世帯単位の集計を入れ子にすることはできません", "unit scopes may not be nested"),
    "linkage_key_output": ("連結キー（世帯番号等）は集計の区分・条件・出力に使用できません",
                           "the linkage key may not be a group key, a filter operand or an output above a unit scope"),
    "unit_aggregate_not_allowed": ("世帯単位の行は COUNT(*) または COUNT(DISTINCT 連結キー) で数えてください",
                                   "unit rows may only be counted with COUNT(*) or COUNT(DISTINCT linkage key)"),
    "unit_view_not_person_unique": ("一人が複数行を持つビューでは世帯単位の集計はできません",
                                    "unit scopes need a view with one row per person"),
    "dp_derived_measure": ("差分プライバシー方式では測定値の列をそのまま集計してください",
                           "in DP mode sums and means must be of a measure column as declared"),
    "epsilon_invalid": ("ε は数値で、1 回あたりの下限以上・上限以下にしてください",
                        "epsilon must be a number between the per-query minimum and cap"),
    "budget_exhausted": ("今期のプライバシー予算が足りません", "the privacy budget for this period is exhausted"),
    "filter_population_below_k": ("条件に該当する人数が少なすぎるため集計できません",
                                  "the population selected by the filters is too small to report"),
    "condition_influence_below_k": ("この条件で対象者がほとんど変わらない（変化が最小度数未満。変化なしを含む）ため集計できません。"
                                    "条件を外すか、広げてください",
                                    "this condition changes who is counted by fewer than the minimum number of "
                                    "persons (or by nobody); remove it or widen it"),
    "expression_not_allowed": ("集計前の行単位の式には、列・定数・整数の四則演算・年月の年/月・CASE・比較（AND/OR/NOT）だけを"
                               "使用できます（docs/guard-language.md）",
                               "below the aggregation only columns, literals, integer arithmetic, the year/month of a "
                               "month column, CASE and comparisons are accepted (see docs/guard-language.md)"),
    "arithmetic_range": ("この計算は値の範囲を超える可能性があるため使用できません",
                         "this arithmetic could exceed the safe range for some value of the column"),
    "division_not_allowed": ("割り算・剰余は 0 以外の定数で割る場合だけ使用できます",
                             "division and modulo are accepted only by a non-zero literal"),
    "type_mismatch": ("型の異なる値は比較できません（文字列は文字列と、数値は数値と比較してください）",
                      "values of different types cannot be compared (compare text with text, numbers with numbers)"),
    "measure_arithmetic": ("測定値（金額等）に計算を加えることはできません。列のまま SUM/AVG してください",
                           "a measure may not be transformed; SUM or AVG the column as it is"),
    "duplicate_output_name": ("副問合せ・CTE の出力列名が重複しています（大文字・小文字の違いだけの重複を含む）",
                              "a subquery or CTE outputs the same column name twice (also when only the case differs)"),
    "reserved_name": ("__ で始まる名前は予約されています", "names starting with __ are reserved by the guard"),
    "unsupported_query": ("この SQL は扱えません", "the guard cannot analyse this query"),
    "too_complex": ("SQL が複雑すぎます", "the query is too complex"),
    "no_data": ("データがまだ取り込まれていません", "no data has been ingested yet"),
    "execution_failed": ("この SQL は実行できませんでした（型・値の誤りなど）",
                         "the query could not be executed (type or value error); details are withheld"),
    "paused_for_review": ("照会の傾向に警告が出たため、照会を停止しています。再開には管理者の確認が必要です",
                          "your queries raised an alert and are paused until an administrator has reviewed them"),
    "audit_unavailable": ("監査ログに記録できないため回答できません",
                          "the audit trail could not be written, so no answer is released"),
    "repeated_shape": ("同じビューの集計のうち、一方が他方の人をすべて含み、ある区分で k 人未満しか違わない組を"
                       "一つの照会に含めることはできません（範囲の定数だけが違う組も）。別々の照会にしてください",
                       "one query may not hold two aggregations of the same views one of which holds all the "
                       "persons of the other while a cell differs by fewer than k (nor two that differ only in "
                       "the constants of ranges); ask them as separate queries"),
    "result_too_large": ("集計結果のセル数の見込みが上限を超えるため実行しません。区分を減らしてください",
                         "the estimated number of cells exceeds the limit; group by fewer or coarser keys"),
    "resource_limit": ("処理時間またはメモリの上限に達したため中止しました。条件や区分を減らしてください",
                       "the query reached the time or memory limit and was stopped; simplify it"),
    "guard_busy": ("混み合っているため実行できませんでした。しばらくしてから再度実行してください",
                   "the guard is busy with other queries; try again shortly"),
    "cancelled": ("接続が切れたため照会を中止しました", "the query was stopped because its client went away"),
}


class QueryRefused(SekishoError):
    """The guard refused a query. ``code`` is stable, ``reason`` bilingual, ``part`` the
    offending SQL fragment (possibly empty)."""

    def __init__(self, code: str, reason: str | None = None, part: str = ""):
        if code not in REASONS:
            raise ValueError(f"unknown refusal code {code!r}")
        ja, en = REASONS[code]
        self.code = code
        self.reason = reason or f"{ja} / {en}"
        self.part = (part or "")[:300]
        super().__init__(f"[{code}] {self.reason}" + (f": {self.part}" if self.part else ""))

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "reason": self.reason, "part": self.part}


def refuse(code: str, node=None, part: str | None = None) -> QueryRefused:
    """Build a refusal naming ``node`` (a sqlglot expression) as the offending part."""
    if part is None and node is not None:
        try:
            part = node.sql(dialect="duckdb")
        except Exception:  # a fragment that cannot be rendered is still a refusal
            part = type(node).__name__
    return QueryRefused(code, part=part or "")
