"""The processing standard (加工基準) as a document, generated from the policy so the two
cannot drift apart (a test compares ``docs/processing-standard.md`` with ``render``).

    python -m sekisho.ingest.standard [POLICY.yaml] > docs/processing-standard.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from sekisho.policy import (Bands, DayOfYear, Derivation, ExactValue, KeyValue, Policy, SourceColumn, Value,
                            View, load_policy, rule_releases)

RULE_TEXT = {
    "drop": "削除",
    "keep": "そのまま保持",
    "keyed_id": "鍵付きハッシュ(HMAC-SHA256)に置換",
    "year_month": "年月(YYYY-MM)に丸め",
    "birth_topcoded": "生年月・生年・年齢・年齢5歳階級に変換(日を削除、トップコーディング)",
    "code_label": "コードを表示名に置換",
    "locate": "町丁目名・地域ブロック・メッシュコードに変換して削除",
    "position": "メッシュコード算出にのみ使用(保持しない)",
    "record_key": "記録キー(_rkey)算出にのみ使用(保持しない)",
}
CLASS_TEXT = {
    "privacy_unit": "P 保護単位",
    "linkage": "L 連結キー",
    "dimension": "D 区分",
    "measure": "M 数値(公開の範囲)",
    "sensitive_measure": "S 要配慮の数値",
}
TYPE_TEXT = {"code": "コード", "text": "文字列", "date": "日付", "integer": "整数", "decimal": "小数"}


def _outputs(col: SourceColumn) -> str:
    """The values the column's rule releases to the views (``sekisho.policy.rule_releases``)."""
    names = ", ".join(f"`{name}`" for name in rule_releases(col))
    if not names:
        return "—"
    if col.rule == "birth_topcoded":
        names += f"(上限 {col.params['top_age']} 歳)"
    if col.rule == "code_label":
        names += " (" + ", ".join(f"{k}→{v}" for k, v in col.params["labels"].items()) + ")"
    return names


def origin_text(op) -> str:
    """A view column's origin in a compact notation: ``person.sex``,
    ``band(age(born=person.birth_date, at=idou_date, top=100), width=5, top=100)``."""
    if isinstance(op, (Value, ExactValue, KeyValue)):
        return str(op)
    if isinstance(op, Bands):
        return op.name
    if isinstance(op, DayOfYear):
        return f"{origin_text(op.year)}-{op.month:02d}-{op.day:02d}"
    if isinstance(op, Derivation):
        parts = []
        for name, value in op.params.items():
            if value is None:
                continue
            if name == "when":
                tested, values = value
                parts.append(f"when {origin_text(tested)} in [{', '.join(map(str, values))}]")
            elif name == "at" and isinstance(value, tuple):
                parts.append("at(" + ", ".join(f"{k}={origin_text(v)}" for k, v in value) + ")")
            elif name == "of" and isinstance(value, tuple):
                parts += [origin_text(v) for v in value]
            elif name == "of":
                parts.append(origin_text(value))
            else:
                parts.append(f"{name}={origin_text(value)}")
        return f"{op.name}({', '.join(parts)})"
    return str(op)


def _view_lines(policy: Policy, view: View) -> list[str]:
    """Where a view's rows come from: its source, joins and record key."""
    source = policy.sources[view.source]
    lines = [f"元データ: {source.title_ja} `{source.file}`(1行 = 1記録)"]
    for join in view.joins.values():
        joined = policy.sources[join.source]
        on = ", ".join(f"{mine} → {theirs}" for mine, theirs in join.on)
        lines.append(f"結合 `{join.alias}`: {joined.title_ja} `{joined.file}` ({on})")
    if view.record_key is not None:
        lines.append("記録キー `_rkey`: " + ("個人ごと(1人1記録)" if view.record_key.record is None
                                           else f"記録ごと(個人 + `{view.record_key.record.column}`)"))
    if view.one_row_per:
        lines.append(f"集約: {', '.join(f'`{c}`' for c in view.one_row_per)} ごとに1行")
    if view.unique_per_person:
        lines.append(f"一意性: 個人 + {' + '.join(f'`{c}`' for c in view.unique_per_person)} ごとに1行"
                     "(取込ごとに検査。違反するデータは取込を拒否)")
    return [f"{line}  " for line in lines[:-1]] + lines[-1:]


def _bands_lines(policy: Policy) -> list[str]:
    """The band schemes (階層区分) and totals the views use."""
    out = []
    for scheme in policy.bands.values():
        out += [f"### 階層区分 `{scheme.name}` {scheme.title_ja}", "",
                f"対象の数値: `{'.'.join(scheme.measure)}`(各階層は「以上・未満」。最初の階層の下限未満の値は取込を拒否)", "",
                "| ラベル | 以上 | 未満 | 説明 |", "|---|---|---|---|"]
        for c in scheme.classes:
            below = "—" if c.hi is None else f"{c.hi:,}"
            out.append(f"| `{_cell(c.label)}` | {c.lo:,} | {below} | {_cell(c.title_ja)} |")
        if scheme.missing:
            out.append(f"| `{_cell(scheme.missing)}` | | | 値なし |")
        out.append("")
    for total in policy.totals.values():
        source = policy.sources[total.source]
        joins = "".join(f"、結合 `{j.alias}`: {policy.sources[j.source].title_ja}" for j in total.joins.values())
        keys = ", ".join(f"{k} = `{v}`" for k, v in total.by.items())
        out += [f"### 合計 `{total.name}` {total.title_ja}", "",
                f"{source.title_ja} `{source.file}`{joins} の `{total.sum.column}` を ({keys}) ごとに合計"
                "(取込内部の表。格納せず、ビューの列が参照し階層区分で出力する)。", ""]
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(policy: Policy) -> str:
    out = [
        f"# 加工基準 — {policy.title_ja}",
        "",
        "<!-- Generated from the policy by `python -m sekisho.ingest.standard`; do not edit by hand. -->",
        "",
        f"Policy `{policy.name}` (municipality code {policy.municipality_code}), "
        f"version `{policy.version}`.",
        "",
        "This is the processing standard applied on upload (`sekisho ingest`): for every column",
        "of every source export, the rule applied and why. Raw values never reach the store;",
        "analysts see only the views below, and only through the guard's disclosure control.",
        "",
        "## 1. 取込ファイルと列ごとの加工 (sources: rule per column and reason)",
        "",
    ]
    for src in policy.sources.values():
        out += [f"### {src.title_ja} — `{src.file}`", ""]
        if src.unique:
            out.append(f"一意キー: {', '.join(f'`{c}`' for c in src.unique)}")
        for ref in src.references:
            out.append(f"参照: {', '.join(ref.columns)} → `{policy.sources[ref.source].file}` "
                       f"({', '.join(ref.target)})")
        dated = [c.name for c in src.columns.values() if c.sets_extract_date]
        if dated:
            out.append(f"抽出日の基準(指定がなければ最新の日付の月末): {', '.join(f'`{c}`' for c in dated)}")
        out += ["", "| 列 | 型 | 必須 | 加工 | 出力 | 理由 |", "|---|---|---|---|---|---|"]
        for col in src.columns.values():
            typ = TYPE_TEXT[col.type] + (f"({col.length}桁)" if col.length else "")
            if col.domain:
                typ += f"; {', '.join(col.domain)}"
            out.append(f"| `{col.name}` | {_cell(typ)} | {'○' if col.required else ''} | "
                       f"{RULE_TEXT[col.rule]} | {_cell(_outputs(col))} | {_cell(col.reason)} |")
        out.append("")
    out += ["全ての人単位の記録には、鍵付きハッシュから導いた永続的な記録キー `_rkey`(0〜255)を付与する。"
            "分析者には見えず、一貫した摂動(セルキー法)にのみ使う。", "",
            "## 2. 分析用ビュー (views analysts may query)", "",
            "各ビューは上の加工で出力された値のみから作る。由来の列: 出力の名前(`結合名.名前` は結合先の出力)、"
            "または導出(`first_of` 最初の空でない値、`is_empty` 空か、`year`/`month`/`fiscal_year` 年月の年・月・年度、"
            "`band` 階級、`age` 正確な日付から取込内部で計算した満年齢(上限あり)、`case` 条件による選択、"
            "`extract_month` 抽出年月、`total` 下の合計の参照、`bands` 下の階層区分のラベル)。", "",
            *_bands_lines(policy)]
    for view in policy.views.values():
        out += [f"### `{view.name}` {view.title_ja}" + (" (公開情報)" if view.public else ""), "",
                f"利用目的: {view.purpose}", "", *_view_lines(policy, view), "",
                "| 列 | 型 | 分類 | 説明 | 値の範囲 | 由来 |", "|---|---|---|---|---|---|"]
        for c in view.columns.values():
            rng = ""
            if c.domain is not None:
                vals = [str(v) for v in c.domain]
                rng = ", ".join(vals) if len(vals) <= 15 else f"{vals[0]} … {vals[-1]} ({len(vals)} 値)"
            elif c.bounds is not None:
                rng = f"{c.bounds[0]:,.0f} 〜 {c.bounds[1]:,.0f}"
            out.append(f"| `{c.name}` | {c.type} | {CLASS_TEXT[c.cls]} | {_cell(c.description_ja)} | "
                       f"{_cell(rng)} | `{_cell(origin_text(c.origin))}` |")
        out.append("")
    d = policy.disclosure
    out += [
        "## 3. 秘匿処理の設定 (disclosure control)", "",
        f"- 最小度数 k = {d.k}(セルの寄与者がこれ未満なら秘匿)",
        f"- 優越性ルール: NK (n={d.dominance.nk_n}, k={d.dominance.nk_k:.0%}), "
        f"p% ルール (p={d.dominance.p_percent:.0%})",
        f"- セルキー摂動: {'有効' if d.perturbation.enabled else '無効'}, 最大変動 {d.perturbation.max_noise}, "
        f"分散 {d.perturbation.variance}, {d.perturbation.min_count} 未満の非ゼロ値は秘匿",
        f"- 条件の影響度チェック: {'有効' if d.condition_influence else '無効'}"
        f"(集計条件の一つ一つが対象者を k 人以上変えない問い合わせは拒否。差分攻撃の防止)",
        f"- 差分プライバシー: 1問い合わせあたり {d.dp.epsilon_per_query_min} ≤ ε ≤ {d.dp.epsilon_per_query_max}, "
        f"予算 {d.dp.budget_per_period} / {d.dp.period}, 1人あたり最大 {d.dp.max_rows_per_person} 行・"
        f"{d.dp.max_groups_per_person} グループ, δ = {d.dp.delta}",
        "",
        "## 4. 役割 (roles)", "",
        "| 役割 | ビュー | モード | 取込 | 監査閲覧 | 報告閲覧 | 分析サーバ |", "|---|---|---|---|---|---|---|",
    ]
    for r in policy.roles.values():
        views = "全て" if set(r.views) == set(policy.views) and r.views else ", ".join(r.views) or "—"
        yes = lambda b: "○" if b else ""  # noqa: E731
        out.append(f"| {r.name} | {views} | {', '.join(r.modes) or '—'} | {yes(r.can_ingest)} | "
                   f"{yes(r.can_review_audit)} | {yes(r.can_read_reports)} | {yes(r.can_start_server)} |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    from sekisho.resources import resource_dir

    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else resource_dir("policies") / "himeji.yaml"
    sys.stdout.write(render(load_policy(path)))


if __name__ == "__main__":
    main()
