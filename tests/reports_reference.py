"""Report figures computed straight from the raw source exports with pandas — no Sekisho
code involved except the public code lists — following docs/reports.md's definitions."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd

from sekisho.reference import AGE_BANDS, SEX

TOP_AGE = 100


def read(exports: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(exports / name, dtype=str, keep_default_na=False)


def ym(dates: pd.Series) -> pd.Series:
    return dates.str[:7]


def completed_years(birth: pd.Series, on: date) -> pd.Series:
    b = pd.to_datetime(birth)
    before_birthday = (on.month * 100 + on.day) < (b.dt.month * 100 + b.dt.day)
    return on.year - b.dt.year - before_birthday.astype(int)


def band(ages: pd.Series) -> pd.Series:
    return ages.map(lambda a: AGE_BANDS[min(int(a) // 5, len(AGE_BANDS) - 1)])


def month_end(month: str) -> date:
    return pd.Period(month, freq="M").end_time.date()


def residents_at(exports: Path, month: str, extract: date) -> pd.DataFrame:
    """Residents at the end of ``month`` with block, sex (男/女) and age band at the end of
    ``month`` (top-coded at 100 as of the extract, like the store)."""
    r = read(exports, "residents.csv")
    present = (ym(r.registered_date) <= month) & ((r.removed_date == "") | (ym(r.removed_date) > month))
    r = r[present].copy()
    master = read(exports, "address_master.csv")[["chome_code", "gaiku", "block"]]
    r = r.merge(master, on=["chome_code", "gaiku"], how="left")
    r["sex_ja"] = r.sex.map(SEX)
    # the store top-codes birth months so that nobody is older than 100 at the extract
    over = (completed_years(r.birth_date, extract) - TOP_AGE).clip(lower=0)
    age = completed_years(r.birth_date, month_end(month)) - over
    r["age_band"] = band(age.clip(lower=0, upper=TOP_AGE))
    return r


def population_block_age_sex(exports: Path, month: str, extract: date) -> pd.Series:
    r = residents_at(exports, month, extract)
    return r.groupby(["block", "age_band", "sex_ja"]).size()


def movements_in(exports: Path, first: str, last: str) -> pd.DataFrame:
    m = read(exports, "movements.csv")
    months = ym(m.idou_date)
    return m[(months >= first) & (months <= last)]


def yearly_totals(exports: Path, windows: list[tuple[str, str, str]]) -> dict[str, pd.Series]:
    """window label -> count per 異動 type."""
    return {label: movements_in(exports, first, last).groupby("idou_type").size()
            for first, last, label in windows}


def households_by_relationship(exports: Path, month: str, extract: date) -> tuple[int, pd.DataFrame]:
    r = residents_at(exports, month, extract)
    per_rel = r.groupby("relationship").agg(households=("setai_no", "nunique"),
                                             persons=("atena_no", "size"))
    return r.setai_no.nunique(), per_rel


def childcare_overview(exports: Path, month: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(capacities, children in use) per facility type and per block of the facility, by 区分."""
    fac = read(exports, "childcare_facilities.csv")
    for c in ("capacity_1", "capacity_2", "capacity_3"):
        fac[c] = fac[c].astype(int)
    cert = read(exports, "childcare_certifications.csv")
    in_use = cert[(cert.facility_id != "") & (ym(cert.use_from) <= month)
                  & ((cert.use_to == "") | (ym(cert.use_to) >= month))]
    in_use = in_use.merge(fac[["facility_id", "facility_type", "block"]], on="facility_id", how="left")
    return fac, in_use


FAMILY_TYPES = ("単独", "夫婦のみ", "夫婦と子供", "ひとり親と子供", "三世代", "その他")


def _family_type(rels: pd.Series) -> str:
    """国勢調査 家族類型 from the 続柄 of the members present (docs/reports.md, *Family types*)."""
    count = rels.value_counts()

    def c(*names: str) -> int:
        return int(sum(count.get(n, 0) for n in names))

    n, head, spouse, child = len(rels), c("世帯主"), c("妻", "夫"), c("子")
    parent, grandchild, in_law, sibling = c("父", "母"), c("孫"), c("子の配偶者"), c("兄弟姉妹")
    if n == 1:
        return "単独"
    if (parent and child) or (grandchild and child + in_law):
        return "三世代"
    if head == 1 and spouse == 1 and n == 2:
        return "夫婦のみ"
    if head == 1 and spouse == 1 and child and n == 2 + child:
        return "夫婦と子供"
    if head == 1 and spouse == 0 and child and n == 1 + child:
        return "ひとり親と子供"
    if head == 1 and spouse == 0 and child == 0 and parent == 1 and n == 2 + sibling:
        return "ひとり親と子供"
    return "その他"


def households_at(exports: Path, month: str, extract: date) -> pd.DataFrame:
    """One row per household (世帯番号) resident at the end of ``month``: its block (the
    first in the code list order of its members' blocks, like MIN), members, 家族類型."""
    r = residents_at(exports, month, extract)
    grouped = r.groupby("setai_no")
    return pd.DataFrame({"block": grouped["block"].min(), "members": grouped.size(),
                         "family_type": grouped["relationship"].agg(_family_type)})
