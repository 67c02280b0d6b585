"""Abstraction rules, one small named unit each, selected per raw column by the policy
(``sources.<source>.columns.<column>.rule``).

A rule turns one raw column into zero or more columns of the staging table
``stg_<source>`` (a SQL select list plus any joins it needs). Columns whose names start
with ``_`` are internal: they exist only in the in-memory working database to derive
other values (a person's exact birth date to compute the age at an event, a record's
identity to derive its record key) and can never reach the store, because a view table
is written with exactly the columns its policy declares (checked in ``views``).

Also here: the SQL building blocks the view builder and its derivations share (age at
a date, top-coding, bands, record keys), the names of the staging columns they read
(``exact_column``, ``join_column``, ``seed_column``), and the two lookup tables rules
join to: keyed-ID maps and the geocoded address master.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pyarrow as pa

from sekisho.ingest import keys
from sekisho.policy import MESH_NAMES, Policy, Source, SourceColumn


@dataclass
class RuleOutput:
    select: list[str] = field(default_factory=list)   # "expr AS name"
    joins: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RuleContext:
    source: Source
    extract_date: date


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def lit(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def typed(col: SourceColumn, ref: str = "r") -> str:
    """The raw VARCHAR value cast to the column's declared type."""
    c = f"{ref}.{ident(col.name)}"
    return {"code": c, "text": c, "date": f"CAST({c} AS DATE)",
            "integer": f"CAST({c} AS BIGINT)", "decimal": f"CAST({c} AS DOUBLE)"}[col.type]


# ---- SQL building blocks ---------------------------------------------------------------


def age_at(birth: str, on: str) -> str:
    """Completed years between two DATE expressions."""
    return (f"(year({on}) - year({birth}) - CASE WHEN month({on}) * 100 + day({on}) "
            f"< month({birth}) * 100 + day({birth}) THEN 1 ELSE 0 END)")


def topcoded_age(birth: str, on: str, top: int) -> str:
    return f"least(greatest({age_at(birth, on)}, 0), {int(top)})"


def band(value: str, width: int, top: int) -> str:
    """Fixed-width bands labelled ``lo-hi``, the last one open (``top+``). Bands are of
    non-negative values: a negative one is labelled ``<0`` (integer division would put
    it in the first band), which no declared domain lists, so the upload is refused."""
    w, t = int(width), int(top)
    return (f"CASE WHEN {value} IS NULL THEN NULL WHEN {value} >= {t} THEN '{t}+' "
            f"WHEN {value} < 0 THEN '<0' "
            f"ELSE CAST(({value} // {w}) * {w} AS VARCHAR) || '-' || "
            f"CAST(({value} // {w}) * {w} + {w - 1} AS VARCHAR) END")


def age_band(age: str, top: int) -> str:
    """e-Stat five-year bands, the last one open: 0-4, ..., 95-99, 100+."""
    return band(age, 5, top)


def topcoded_birth_ym(birth: str, ref: date, top: int) -> str:
    """Birth year-month; anyone aged ``top`` or more at ``ref`` gets the month that makes
    them exactly ``top``, so the true age of the very old is not revealed."""
    ref_sql = f"DATE {lit(ref.isoformat())}"
    clamp = f"strftime({ref_sql} - INTERVAL {int(top)} YEAR, '%Y-%m')"
    return (f"CASE WHEN {age_at(birth, ref_sql)} >= {int(top)} THEN {clamp} "
            f"ELSE strftime({birth}, '%Y-%m') END")


def topcoded_birth_year(birth: str, ref: date, top: int) -> str:
    ref_sql = f"DATE {lit(ref.isoformat())}"
    return (f"CASE WHEN {age_at(birth, ref_sql)} >= {int(top)} THEN {ref.year - int(top)} "
            f"ELSE year({birth}) END")


def person_rkey(seed: str) -> str:
    """Record key of a person-level record: first byte of the person's secret seed."""
    return f"CAST(('0x' || substr({seed}, 1, 2)) AS SMALLINT)"


def event_rkey(seed: str, table: str, record: str) -> str:
    """Record key of an event: a byte of sha256(person seed : table : record identity).
    Permanent across uploads; unknowable without the instance secret (the seed is an HMAC)."""
    return (f"CAST(('0x' || substr(sha256({seed} || ':' || {lit(table)} || ':' || "
            f"CAST({record} AS VARCHAR)), 1, 2)) AS SMALLINT)")


# ---- staging columns the view builder reads ---------------------------------------------


def exact_column(column: str, rule: str) -> str:
    """The staging column that holds raw column ``column``'s exact value after its rule
    (one of ``sekisho.policy.EXACT_VALUE_RULES``): the kept value itself, or the internal
    ``_`` column the rule leaves for derivations."""
    return {"keep": column, "year_month": "_" + column, "birth_topcoded": "_" + column,
            "record_key": "_record_" + column}[rule]


def join_column(col: SourceColumn) -> str:
    """The staging column a join matches on: a kept value, or for a keyed identifier the
    dense integer of its keymap (equal raw values, equal integers; cheaper than the hex)."""
    return ident(col.name) if col.rule == "keep" else ident("_n_" + col.params["as"])


def seed_column(keyed_name: str) -> str:
    """The staging column with the secret record-key seed of keyed identifier ``keyed_name``."""
    return ident("_seed_" + keyed_name)


def unit_namespaces(policy: Policy) -> set[str]:
    """The keyed-ID namespaces of the views' privacy units: the ones whose keymaps carry
    a record-key seed."""
    out = set()
    for view in policy.views.values():
        unit = view.privacy_unit
        if unit is not None:
            origin = view.columns[unit].origin     # a keyed_id value of the view's source
            out.add(policy.sources[view.source].columns[origin.released.column].params["namespace"])
    return out


# ---- keyed identifiers ----------------------------------------------------------------


def keyed_id(secret: bytes, namespace: str, value: str) -> str:
    """HMAC-SHA256 of a raw identifier under the instance secret, hex (the stored ID)."""
    return hmac.digest(secret, f"{namespace}:{value}".encode(), "sha256").hex()


def _digests(secret: bytes, prefix: bytes, values: list[str], pool=None) -> pa.Array:
    """HMAC-SHA256 of every value, as one fixed-size binary array (hex is done in SQL)."""
    blob = pool.digests(secret, prefix, values) if pool is not None else keys.digests(secret, prefix, values)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(values), [None, pa.py_buffer(blob)])


def build_keymaps(con, policy: Policy, secret: bytes, pool=None) -> dict[str, int]:
    """For each keyed-ID namespace, map every distinct raw value to its keyed ID ``kid``
    (hex), a dense integer ``n`` used for joins inside the working database, and, for the
    namespace of the privacy unit, the secret record-key ``seed``. HMAC runs in Python
    once per distinct identifier, not once per row."""
    seeded = unit_namespaces(policy)
    columns: dict[str, list[tuple[str, str]]] = {}
    for sname, src in policy.sources.items():
        for col in src.columns.values():
            if col.rule == "keyed_id":
                columns.setdefault(col.params["namespace"], []).append((sname, col.name))
    sizes = {}
    for ns, cols in columns.items():
        union = " UNION ".join(f"SELECT {ident(c)} AS v FROM raw_{s} WHERE {ident(c)} IS NOT NULL"
                               for s, c in cols)
        values = con.execute(f"SELECT DISTINCT v FROM ({union})").to_arrow_table().column(0)
        pylist = values.cast(pa.binary()).to_pylist()   # UTF-8 bytes, no per-value encode
        table = {"raw": values, "kid_b": _digests(secret, f"{ns}:".encode(), pylist, pool)}
        if ns in seeded:
            table["seed_b"] = _digests(secret, f"rkey:{ns}:".encode(), pylist, pool)
        con.register(f"_keymap_{ns}_arrow", pa.table(table))
        seed = "lower(hex(seed_b))" if ns in seeded else "CAST(NULL AS VARCHAR)"
        con.execute(f"CREATE TABLE keymap_{ns} AS SELECT raw, lower(hex(kid_b)) AS kid, "
                    f"{seed} AS seed, CAST(row_number() OVER () AS BIGINT) AS n "
                    f"FROM _keymap_{ns}_arrow")
        con.unregister(f"_keymap_{ns}_arrow")
        sizes[ns] = len(pylist)
    return sizes


# ---- geocoded address master ------------------------------------------------------------

MESH_LEVELS = dict(zip(MESH_NAMES, (3, 4, 5)))   # JIS X 0410 levels in jismesh: 1km, 500m, 250m


def address_masters(policy: Policy) -> list[Source]:
    """The sources some locate rule's reference points to (``SourceColumn.locate_via``)."""
    names = {col.locate_via.source for src in policy.sources.values() for col in src.columns.values()
             if col.rule == "locate"}
    return [policy.sources[name] for name in sorted(names)]


def build_geo(con, policy: Policy) -> int:
    """``geo_<master>`` for every address master: its rows with their kept columns (the
    keys locate joins on, the names it carries) and the JIS X 0410 mesh codes of each
    row's representative point (its ``position`` columns, by axis). Returns the rows."""
    import jismesh.utils as ju

    rows = 0
    for master in address_masters(policy):
        axis = {c.params["axis"]: c.name for c in master.columns.values() if c.rule == "position"}
        kept = [c.name for c in master.columns.values() if c.rule == "keep"]
        t = con.execute(f"""
            SELECT {', '.join(ident(c) for c in kept)},
                   CAST({ident(axis['latitude'])} AS DOUBLE) AS _latitude,
                   CAST({ident(axis['longitude'])} AS DOUBLE) AS _longitude
            FROM raw_{master.name}""").to_arrow_table()
        lat = t.column("_latitude").to_numpy()
        lon = t.column("_longitude").to_numpy()
        meshes = {name: pa.array(np.asarray(ju.to_meshcode(lat, lon, level)).astype(np.int64).astype(str))
                  for name, level in MESH_LEVELS.items()}
        geo = pa.table({**{c: t.column(c) for c in kept}, **meshes})
        con.register("_geo_arrow", geo)
        con.execute(f"CREATE TABLE geo_{master.name} AS SELECT * FROM _geo_arrow")
        con.unregister("_geo_arrow")
        rows += geo.num_rows
    return rows


# ---- the rules --------------------------------------------------------------------------


def drop(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """Removed entirely (direct identifiers, precise addresses)."""
    return RuleOutput()


def keep(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """Kept as is, cast to its declared type."""
    return RuleOutput([f"{typed(col)} AS {ident(col.name)}"])


def keyed_id_rule(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """Replaced by its keyed irreversible transform (HMAC-SHA256 under the instance
    secret): the same raw ID always gives the same keyed ID, so records link across
    tables and uploads; without the secret it cannot be reversed or recomputed."""
    ns, out = col.params["namespace"], col.params["as"]
    alias = f"k_{col.name}"
    return RuleOutput(
        [f"{alias}.kid AS {ident(out)}", f"{alias}.seed AS {ident('_seed_' + out)}",
         f"{alias}.n AS {ident('_n_' + out)}"],
        [f"LEFT JOIN keymap_{ns} {alias} ON {alias}.raw = r.{ident(col.name)}"])


def year_month(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """A date coarsened to YYYY-MM (the exact date stays internal for derivations)."""
    d = typed(col)
    return RuleOutput([f"strftime({d}, '%Y-%m') AS {ident(col.params['as'])}",
                       f"{d} AS {ident('_' + col.name)}"])


def birth_topcoded(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """Birth date -> birth_ym, birth_year, age and age band at the extract date, ages
    top-coded (and birth month/year clamped) at ``top_age``; the day is dropped."""
    top, d, ref = int(col.params["top_age"]), typed(col), ctx.extract_date
    ref_sql = f"DATE {lit(ref.isoformat())}"
    age = topcoded_age(d, ref_sql, top)
    return RuleOutput([
        f"{topcoded_birth_ym(d, ref, top)} AS birth_ym",
        f"{topcoded_birth_year(d, ref, top)} AS birth_year",
        f"{age} AS age",
        f"{age_band(age, top)} AS age_band",
        f"{d} AS {ident('_' + col.name)}",
    ])


def code_label(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """A code replaced by its public label (e.g. 性別 1 -> 男)."""
    c = f"r.{ident(col.name)}"
    cases = " ".join(f"WHEN {lit(k)} THEN {lit(v)}" for k, v in col.params["labels"].items())
    return RuleOutput([f"CASE {c} {cases} END AS {ident(col.params.get('as', col.name))}"])


def locate(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """A 街区 (block inside a 町丁目) replaced by what the address master says of it —
    the columns it ``carry``s (e.g. the 町丁目 name, the 地域ブロック) and the
    1km/500m/250m mesh codes of its representative point; the 街区 itself is dropped."""
    prefix, via = col.params.get("prefix", ""), col.locate_via
    alias = ident(f"g_{col.name}")
    on = " AND ".join(f"{alias}.{ident(theirs)} = r.{ident(mine)}" for mine, theirs in zip(via.columns, via.target))
    return RuleOutput(
        [f"{alias}.{ident(master_column)} AS {ident(prefix + name)}"
         for name, master_column in col.params["carry"].items()]
        + [f"{alias}.{m} AS {ident(prefix + m)}" for m in MESH_LEVELS],
        [f"LEFT JOIN geo_{via.source} {alias} ON {on}"])


def position(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """Coordinates used only to compute mesh codes (``build_geo``); not kept."""
    return RuleOutput()


def record_key(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """A record identity used only to derive the record key; not kept."""
    return RuleOutput([f"r.{ident(col.name)} AS {ident(exact_column(col.name, 'record_key'))}"])


RULES = {
    "drop": drop,
    "keep": keep,
    "keyed_id": keyed_id_rule,
    "year_month": year_month,
    "birth_topcoded": birth_topcoded,
    "code_label": code_label,
    "locate": locate,
    "position": position,
    "record_key": record_key,
}


def stage(con, source: Source, extract_date: date) -> list[str]:
    """Create ``stg_<source>`` by applying every column's rule; return its columns."""
    ctx = RuleContext(source=source, extract_date=extract_date)
    select, joins = [], []
    for col in source.columns.values():
        out = RULES[col.rule](col, ctx)
        select += out.select
        joins += out.joins
    if not select:
        select = ["1 AS _nothing"]
    con.execute(f"CREATE TABLE stg_{source.name} AS SELECT {', '.join(select)} "
                f"FROM raw_{source.name} r {' '.join(joins)}")
    return [r[0] for r in con.execute(f"DESCRIBE stg_{source.name}").fetchall()]
