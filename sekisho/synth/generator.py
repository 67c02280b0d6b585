"""Orchestrates a synthetic export: geography, facilities, then households chunk by chunk.

Determinism: every chunk draws from its own ``numpy.random.Generator`` seeded with
``SeedSequence([seed, stream, chunk_index])`` and chunks hold a fixed number of households,
so the same (seed, population, extract date) always yields byte-identical files, and memory
stays bounded by the chunk size whatever the population.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from sekisho.errors import SekishoError
from sekisho.reference import (BLOCKS, CERT_TYPES, CITY_NAME, FACILITY_TYPES, IDOU_TYPES, MUNICIPALITIES,
                               PREF_NAME, RELATIONSHIPS, REMOVAL_REASONS, SEX)
from sekisho.synth import params as P
from sekisho.synth.childcare import Facilities, build_facilities, certifications
from sekisho.synth.dates import NEVER, add_years, from_days, to_days, ymd
from sekisho.synth.events import current_address, derive_events, registered_dates
from sekisho.synth.geography import Geography, build_geography
from sekisho.synth.names import NAMES
from sekisho.synth.output import COLUMNS, CsvSink
from sekisho.synth.population import children_who_left, current_households, deaths, departing_households
from sekisho.synth.records import REASON_DEATH, REASON_OUT, Households, People, Window, _concat
from sekisho.synth.tax import resident_tax
from sekisho.synth.timelines import AddressSampler

GENERATOR_VERSION = 1
DEFAULT_EXTRACT_DATE = dt.date(2026, 10, 31)
DEFAULT_POPULATION = 530_000
STREAM_FACILITIES, STREAM_CHUNKS = 1, 2
ADDRESS_PREFIX = PREF_NAME + CITY_NAME


class SynthError(SekishoError, ValueError):
    """Bad parameters for the generator (message names the parameter)."""


@dataclass
class _Counters:
    atena: int = 1
    setai: int = 1
    idou: int = 1
    cert: int = 1
    households: int = 0
    current: int = 0
    removed: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)  # (type, year) -> count


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


# --- pyarrow column helpers --------------------------------------------------------------

def _digits(values: np.ndarray, width: int, offset: int = 0) -> pa.Array:
    return pc.utf8_lpad(pc.cast(pa.array(values + offset, pa.int64()), pa.string()), width, "0")


def _date(days: np.ndarray) -> pa.Array:
    days = np.asarray(days, dtype=np.int64)
    return pa.array(np.where(days == NEVER, 0, days).astype(np.int32), pa.date32(), mask=days == NEVER)


def _lookup(table: pa.Array, index: np.ndarray, missing: int = -1) -> pa.Array:
    index = np.asarray(index, dtype=np.int64)
    idx = pa.array(np.where(index == missing, 0, index), pa.int64(), mask=index == missing)
    return table.take(idx)


def _int_str(values: np.ndarray, missing: int = -1) -> pa.Array:
    values = np.asarray(values, dtype=np.int64)
    return pc.cast(pa.array(values, pa.int64(), mask=values == missing), pa.string())


def _join(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


class _Static:
    """Lookup arrays shared by all chunks."""

    def __init__(self, geo: Geography, facilities: Facilities) -> None:
        self.chome_code = pa.array(geo.chome_code.tolist())
        self.chome_name = pa.array(geo.chome_name.tolist())
        self.rel = pa.array(list(RELATIONSHIPS))
        self.sex = pa.array(list(SEX))
        self.idou = pa.array(list(IDOU_TYPES))
        self.reason = pa.array([None, *REMOVAL_REASONS], pa.string())
        codes = list(MUNICIPALITIES)
        self.muni_code = pa.array(codes)
        self.muni_pref = pa.array([MUNICIPALITIES[c][0] for c in codes])
        self.muni_name = pa.array([MUNICIPALITIES[c][1] for c in codes])
        self.cert_type = pa.array(list(CERT_TYPES))
        self.facility_id = pa.array(facilities.facility_id)
        self.given_kanji = pa.concat_arrays(NAMES.given_kanji)
        self.given_kana = pa.concat_arrays(NAMES.given_kana)
        self.n_male_given = len(NAMES.given_kanji[0])
        assert REASON_OUT == 1 and REASON_DEATH == 2 and REMOVAL_REASONS == ("転出", "死亡")


# --- static files ------------------------------------------------------------------------

def _address_master(geo: Geography) -> pa.Table:
    c = geo.gaiku_chome
    return pa.table({
        "chome_code": pa.array(geo.chome_code[c].tolist()),
        "chome_name": pa.array(geo.chome_name[c].tolist()),
        "block": pa.array([BLOCKS[b] for b in geo.chome_block[c]]),
        "gaiku": pa.array([str(g) for g in geo.gaiku_no]),
        "lat": pa.array(geo.gaiku_lat),
        "lon": pa.array(geo.gaiku_lon),
    })


def _facilities_table(geo: Geography, f: Facilities) -> pa.Table:
    return pa.table({
        "facility_id": pa.array(f.facility_id),
        "facility_name": pa.array(f.name),
        "facility_type": pa.array([FACILITY_TYPES[t] for t in f.type]),
        "block": pa.array([BLOCKS[b] for b in f.block]),
        "chome_code": pa.array(geo.chome_code[f.chome].tolist()),
        "capacity_1": pa.array(f.capacity[0]),
        "capacity_2": pa.array(f.capacity[1]),
        "capacity_3": pa.array(f.capacity[2]),
    })


# --- one chunk -----------------------------------------------------------------------------

def _chunk(rng, window: Window, sampler: AddressSampler, persons_cap: int):
    cur, cur_people, head_age = current_households(rng, window, sampler, P.HOUSEHOLDS_PER_CHUNK, persons_cap)
    n_cur = len(cur)
    dep, dep_people = departing_households(rng, window, sampler, int(rng.poisson(P.DEPART_RATE * n_cur)))
    dead_hh, dead_people, widowed = deaths(rng, window, sampler, cur, cur_people, head_age,
                                           int(rng.poisson(P.DEATH_RATE * n_cur)))
    left = children_who_left(rng, window, cur, cur_people, head_age)
    households = _concat([cur, dep, dead_hh], Households)
    dep_people.hh = dep_people.hh + n_cur
    dead_people.hh = dead_people.hh + n_cur + len(dep)
    people = _concat([cur_people, widowed, left, dep_people, dead_people], People)
    # household members together, current members first, then those who left
    order = np.lexsort((np.arange(len(people.hh)), people.hh))
    people = People(**{f: getattr(people, f)[order] for f in People.__dataclass_fields__
                       if getattr(people, f) is not None})
    people.registered = registered_dates(households, people)
    return households, people, n_cur


def _tables(rng, window: Window, static: _Static, geo: Geography, facilities: Facilities,
            households: Households, people: People, counters: _Counters):
    n = len(people.hh)
    atena_no = np.arange(n, dtype=np.int64) + counters.atena
    setai_no = np.arange(len(households), dtype=np.int64) + counters.setai
    counters.atena += n
    counters.setai += len(households)

    chome, gaiku, go = current_address(households, people)
    sex_index = people.sex.astype(np.int64) - 1
    birth_year = ymd(people.birth)[0]
    given = NAMES.given_index(rng, birth_year) + sex_index * static.n_male_given
    family = pa.array(people.family, pa.int64())
    given_pa = pa.array(given, pa.int64())
    chome_name = static.chome_name.take(pa.array(chome))
    banchi = _join(_int_str(gaiku), "番", _int_str(go), "号")
    reason = np.where(people.exit == NEVER, 0, people.reason)
    residents = pa.table({
        "atena_no": _digits(atena_no, 10),
        "setai_no": _join("1", _digits(setai_no[people.hh], 9)),
        "name": _join(NAMES.family_kanji.take(family), " ", static.given_kanji.take(given_pa)),
        "name_kana": _join(NAMES.family_kana.take(family), " ", static.given_kana.take(given_pa)),
        "birth_date": _date(people.birth),
        "sex": static.sex.take(pa.array(sex_index)),
        "relationship": static.rel.take(pa.array(people.rel.astype(np.int64))),
        "chome_code": static.chome_code.take(pa.array(chome)),
        "chome_name": chome_name,
        "gaiku": _int_str(gaiku),
        "banchi": banchi,
        "address": _join(ADDRESS_PREFIX, chome_name, banchi),
        "registered_date": _date(people.registered),
        "removed_date": _date(people.exit),
        "removal_reason": static.reason.take(pa.array(reason.astype(np.int64))),
    })

    events = derive_events(window, households, people)
    k = len(events.person)
    notified = np.minimum(events.date + rng.integers(0, 15, k), window.extract)
    idou_id = np.arange(k, dtype=np.int64) + counters.idou
    counters.idou += k
    movements = pa.table({
        "idou_id": _digits(idou_id, 12),
        "atena_no": _digits(atena_no[events.person], 10),
        "setai_no": _join("1", _digits(setai_no[people.hh[events.person]], 9)),
        "idou_type": static.idou.take(pa.array(events.type.astype(np.int64))),
        "idou_date": _date(events.date),
        "notified_date": _date(notified),
        "from_pref_code": _lookup(static.muni_pref, np.where(events.type == 0, events.muni, -1)),
        "from_muni_code": _lookup(static.muni_code, np.where(events.type == 0, events.muni, -1)),
        "from_muni_name": _lookup(static.muni_name, np.where(events.type == 0, events.muni, -1)),
        "to_pref_code": _lookup(static.muni_pref, np.where(events.type == 1, events.muni, -1)),
        "to_muni_code": _lookup(static.muni_code, np.where(events.type == 1, events.muni, -1)),
        "to_muni_name": _lookup(static.muni_name, np.where(events.type == 1, events.muni, -1)),
        "from_chome_code": _lookup(static.chome_code, events.from_chome),
        "from_gaiku": _int_str(events.from_gaiku),
        "to_chome_code": _lookup(static.chome_code, events.to_chome),
        "to_gaiku": _int_str(events.to_gaiku),
    })
    years = ymd(events.date)[0]
    pairs, counts = np.unique(np.stack([events.type.astype(np.int64), years]), axis=1, return_counts=True)
    for (t, y), c in zip(pairs.T.tolist(), counts.tolist()):
        counters.events[(IDOU_TYPES[t], y)] += c

    current = people.exit == NEVER
    certs = certifications(rng, window.extract, people.birth, people.registered, current,
                           geo.chome_block[chome], facilities)
    c = len(certs.person)
    cert_no = np.arange(c, dtype=np.int64) + counters.cert
    counters.cert += c
    certifications_table = pa.table({
        "cert_no": _join("C", _digits(cert_no, 9)),
        "atena_no": _digits(atena_no[certs.person], 10),
        "cert_type": static.cert_type.take(pa.array(certs.cert_type.astype(np.int64))),
        "cert_date": _date(certs.cert_date),
        "valid_from": _date(certs.valid_from),
        "valid_to": _date(certs.valid_to),
        "facility_id": _lookup(static.facility_id, certs.facility),
        "use_from": _date(certs.use_from),
        "use_to": _date(certs.use_to),
    })

    extract_year = ymd(np.array([window.extract]))[0][0]
    tax = resident_tax(rng, (int(extract_year) - 1, int(extract_year)), people.birth, people.sex,
                       people.registered, people.exit)
    tax_table = pa.table({
        "atena_no": _digits(atena_no[tax.person], 10),
        "tax_year": pa.array(tax.tax_year, pa.int64()),
        "taxable_income": pa.array(tax.taxable_income, pa.int64()),
        "income_levy": pa.array(tax.income_levy, pa.int64()),
        "per_capita_levy": pa.array(tax.per_capita_levy, pa.int64()),
    })

    counters.current += int(current.sum())
    for r, cnt in zip(*np.unique(reason[~current], return_counts=True)):
        counters.removed[REMOVAL_REASONS[int(r) - 1]] += int(cnt)
    return residents, movements, certifications_table, tax_table


# --- entry point ---------------------------------------------------------------------------

def generate(out_dir: Path | str, population: int = DEFAULT_POPULATION, seed: int = 0,
             encoding: str = "utf-8", extract_date: dt.date = DEFAULT_EXTRACT_DATE,
             progress: bool = False) -> dict:
    """Write the six CSV files and manifest.json into ``out_dir``; return the manifest.

    ``population`` is the number of residents at the extract date; the residents file also
    holds everyone removed (転出, 死亡) during the five years before it.
    """
    if not isinstance(population, int) or population < 100:
        raise SynthError(f"population must be an integer of at least 100, got {population!r}")
    if not isinstance(seed, int) or seed < 0:
        raise SynthError(f"seed must be a non-negative integer, got {seed!r}")
    if encoding not in ("utf-8", "cp932"):
        raise SynthError(f"encoding must be utf-8 or cp932, got {encoding!r}")
    out_dir = Path(out_dir)
    extract = to_days(extract_date)
    window = Window(start=int(add_years(np.array([extract]), -P.WINDOW_YEARS)[0]) + 1, extract=extract)

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".synth-", dir=out_dir))
    sinks: dict[str, CsvSink] = {}
    try:
        sinks = {name: CsvSink(staging / name, cols, encoding) for name, cols in COLUMNS.items()}
        geo = build_geography()
        facilities = build_facilities(_rng(seed, STREAM_FACILITIES), geo, population)
        static = _Static(geo, facilities)
        sampler = AddressSampler(geo)
        sinks["address_master.csv"].write(_address_master(geo))
        sinks["childcare_facilities.csv"].write(_facilities_table(geo, facilities))

        counters = _Counters()
        expected_chunks = -(-population // int(P.HOUSEHOLDS_PER_CHUNK * 2.33))
        remaining, index = population, 0
        with tqdm(total=population, unit="person", file=sys.stderr, disable=not progress,
                  desc="sekisho synth") as bar:
            while remaining > 0:
                rng = _rng(seed, STREAM_CHUNKS, index)
                households, people, n_cur = _chunk(rng, window, sampler, remaining)
                counters.households += n_cur
                tables = _tables(rng, window, static, geo, facilities, households, people, counters)
                for name, table in zip(("residents.csv", "movements.csv", "childcare_certifications.csv",
                                        "resident_tax.csv"), tables):
                    sinks[name].write(table)
                done = int((people.exit == NEVER).sum())
                remaining -= done
                bar.update(done)
                index += 1
        files = {name: sink.close() for name, sink in sinks.items()}
        # an old manifest must not vouch for a mix of old and new files if a move fails
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for name in files:
            os.replace(staging / name, out_dir / name)
        manifest = {
            "generator": "sekisho.synth",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "population": population,
            "extract_date": extract_date.isoformat(),
            "window": [from_days(window.start).isoformat(), extract_date.isoformat()],
            "encoding": encoding,
            "chunks": index,
            "expected_chunks": expected_chunks,
            "households_current": counters.households,
            "residents_current": counters.current,
            "residents_removed": dict(sorted(counters.removed.items())),
            "events_per_year": {t: {str(y): c for (tt, y), c in sorted(counters.events.items()) if tt == t}
                                for t in IDOU_TYPES},
            "files": files,
        }
        text = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        (out_dir / "manifest.json").write_text(text, encoding="utf-8")
        return manifest
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
