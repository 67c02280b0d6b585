"""Abstraction rules, one small named unit each, selected per raw column by the policy
(``sources.<source>.columns.<column>.rule``).

A rule turns one raw column into zero or more columns of the staging table
``stg_<source>`` (a SQL select list plus any joins it needs). Columns whose names start
with ``_`` are internal: they exist only in the in-memory working database to derive
other values (a person's exact birth date to compute the age at an event, a record's
identity to derive its record key) and can never reach the store, because a view table
is written with exactly the columns its policy declares (checked in ``views``).

Also here: the SQL building blocks the view builders share (age at a date, top-coding,
e-Stat age bands, record keys) and the two lookup tables rules join to: keyed-ID maps
and the geocoded address master.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pyarrow as pa

from sekisho.ingest import keys
from sekisho.policy import Policy, Source, SourceColumn


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


def age_band(age: str, top: int) -> str:
    """e-Stat five-year bands, the last one open: 0-4, ..., 95-99, 100+."""
    return (f"CASE WHEN {age} IS NULL THEN NULL WHEN {age} >= {int(top)} THEN '{int(top)}+' "
            f"ELSE CAST(({age} // 5) * 5 AS VARCHAR) || '-' || CAST(({age} // 5) * 5 + 4 AS VARCHAR) END")


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


# ---- keyed identifiers ----------------------------------------------------------------


def keyed_id(secret: bytes, namespace: str, value: str) -> str:
    """HMAC-SHA256 of a raw identifier under the instance secret, hex (the stored ID)."""
    return hmac.digest(secret, f"{namespace}:{value}".encode(), "sha256").hex()


def rkey_seed(secret: bytes, namespace: str, value: str) -> str:
    """A second, independent HMAC from which record keys are derived (never stored)."""
    return hmac.digest(secret, f"rkey:{namespace}:{value}".encode(), "sha256").hex()


def _digests(secret: bytes, prefix: bytes, values: list[str], pool=None) -> pa.Array:
    """HMAC-SHA256 of every value, as one fixed-size binary array (hex is done in SQL)."""
    blob = pool.digests(secret, prefix, values) if pool is not None else keys.digests(secret, prefix, values)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(values), [None, pa.py_buffer(blob)])


def build_keymaps(con, policy: Policy, secret: bytes, pool=None) -> dict[str, int]:
    """For each keyed-ID namespace, map every distinct raw value to its keyed ID ``kid``
    (hex), a dense integer ``n`` used for joins inside the working database, and, for the
    namespace of the privacy unit, the secret record-key ``seed``. HMAC runs in Python
    once per distinct identifier, not once per row."""
    units = {c.name for v in policy.views.values() for c in v.columns.values() if c.cls == "privacy_unit"}
    columns: dict[str, list[tuple[str, str]]] = {}
    seeded: set[str] = set()
    for sname, src in policy.sources.items():
        for col in src.columns.values():
            if col.rule == "keyed_id":
                ns = col.params["namespace"]
                columns.setdefault(ns, []).append((sname, col.name))
                if col.params["as"] in units:
                    seeded.add(ns)
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

MESH_LEVELS = {"mesh1km": 3, "mesh500m": 4, "mesh250m": 5}   # JIS X 0410 levels in jismesh


def build_geo(con, policy: Policy) -> int:
    """``geo``: one row per (chome_code, gaiku) of the address master with its 町丁目 name,
    地域ブロック and JIS X 0410 mesh codes computed from the gaiku's representative point."""
    import jismesh.utils as ju

    master = next((s for s in policy.sources.values()
                   if any(c.rule == "position" for c in s.columns.values())), None)
    if master is None:
        return 0
    t = con.execute(f"""
        SELECT chome_code, gaiku, chome_name, block,
               CAST(lat AS DOUBLE) AS lat, CAST(lon AS DOUBLE) AS lon
        FROM raw_{master.name}""").to_arrow_table()
    lat = t.column("lat").to_numpy()
    lon = t.column("lon").to_numpy()
    meshes = {name: pa.array(np.asarray(ju.to_meshcode(lat, lon, level)).astype(np.int64).astype(str))
              for name, level in MESH_LEVELS.items()}
    geo = pa.table({"chome_code": t.column("chome_code"), "gaiku": t.column("gaiku"),
                    "chome_name": t.column("chome_name"), "block": t.column("block"), **meshes})
    con.register("_geo_arrow", geo)
    con.execute("CREATE TABLE geo AS SELECT * FROM _geo_arrow")
    con.unregister("_geo_arrow")
    return geo.num_rows


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
    """A 街区 (block inside a 町丁目) replaced by the 町丁目 name, 地域ブロック and
    1km/500m/250m mesh codes of its representative point; the 街区 itself is dropped."""
    prefix = col.params.get("prefix", "")
    alias = f"g_{col.name}"
    return RuleOutput(
        [f"{alias}.chome_name AS {ident(prefix + 'area_name')}",
         f"{alias}.block AS {ident(prefix + 'block')}"]
        + [f"{alias}.{m} AS {ident(prefix + m)}" for m in MESH_LEVELS],
        [f"LEFT JOIN geo {alias} ON {alias}.chome_code = r.{ident(col.params['chome'])} "
         f"AND {alias}.gaiku = r.{ident(col.name)}"])


def position(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """Coordinates used only to compute mesh codes (``build_geo``); not kept."""
    return RuleOutput()


def record_key(col: SourceColumn, ctx: RuleContext) -> RuleOutput:
    """A record identity used only to derive the record key; not kept."""
    return RuleOutput([f"r.{ident(col.name)} AS _record"])


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
