"""Public reference data shared by every part of Sekisho.

Everything here is public information (code lists, the city's identity, statistical
conventions), never personal data. Other modules import these constants instead of
spelling the values again, so the synthetic generator, the ingest validation, the
policy domains and the reports all agree.

Sources: 総務省 全国地方公共団体コード (6 digits incl. check digit), e-Stat 5-year age
bands, 国勢調査 世帯の家族類型, 住民基本台帳 異動事由, 子ども・子育て支援法 支給認定区分,
姫路市 地域ブロック (13).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

# --- the city -----------------------------------------------------------------------

CITY_CODE = "282014"
CITY_NAME = "姫路市"
PREF_CODE = "28"
PREF_NAME = "兵庫県"


def lg_check_digit(code5: str) -> str:
    """Check digit of a 全国地方公共団体コード given its first 5 digits.

    Weights 6,5,4,3,2; digit = (11 - sum mod 11) mod 10 (so 11 -> 1 and 10 -> 0).
    """
    if len(code5) != 5 or not code5.isdigit():
        raise ValueError(f"municipality code must be 5 digits before the check digit, got {code5!r}")
    total = sum(int(d) * w for d, w in zip(code5, (6, 5, 4, 3, 2)))
    return str((11 - total % 11) % 10)


def is_valid_muni_code(code6: str) -> bool:
    """True if ``code6`` is a well-formed 6-digit 全国地方公共団体コード."""
    return (isinstance(code6, str) and len(code6) == 6 and code6.isdigit()
            and lg_check_digit(code6[:5]) == code6[5])


# --- prefectures (JIS X 0401) -------------------------------------------------------

PREFECTURES: dict[str, str] = {
    "01": "北海道", "02": "青森県", "03": "岩手県", "04": "宮城県", "05": "秋田県",
    "06": "山形県", "07": "福島県", "08": "茨城県", "09": "栃木県", "10": "群馬県",
    "11": "埼玉県", "12": "千葉県", "13": "東京都", "14": "神奈川県", "15": "新潟県",
    "16": "富山県", "17": "石川県", "18": "福井県", "19": "山梨県", "20": "長野県",
    "21": "岐阜県", "22": "静岡県", "23": "愛知県", "24": "三重県", "25": "滋賀県",
    "26": "京都府", "27": "大阪府", "28": "兵庫県", "29": "奈良県", "30": "和歌山県",
    "31": "鳥取県", "32": "島根県", "33": "岡山県", "34": "広島県", "35": "山口県",
    "36": "徳島県", "37": "香川県", "38": "愛媛県", "39": "高知県", "40": "福岡県",
    "41": "佐賀県", "42": "長崎県", "43": "熊本県", "44": "大分県", "45": "宮崎県",
    "46": "鹿児島県", "47": "沖縄県",
}

# --- 地域ブロック (fixed order; used as the policy domain of `block`) --------------------

BLOCKS: tuple[str, ...] = (
    "安富", "家島", "広畑", "香寺", "飾磨", "西部", "中部第一", "中部第二",
    "東部", "灘", "北部", "夢前", "網干",
)

# --- ages (e-Stat 5-year bands, top band 100+) --------------------------------------

AGE_TOP = 100
AGE_BANDS: tuple[str, ...] = tuple(f"{lo}-{lo + 4}" for lo in range(0, AGE_TOP, 5)) + (f"{AGE_TOP}+",)
_AGE_BANDS_ARRAY = np.array(AGE_BANDS, dtype=object)


def age_band(age: int) -> str:
    """e-Stat 5-year band of a single age: 0 -> '0-4', 97 -> '95-99', 104 -> '100+'."""
    if age is None or age < 0:
        raise ValueError(f"age must be a non-negative integer, got {age!r}")
    return AGE_BANDS[min(int(age) // 5, len(AGE_BANDS) - 1)]


def age_bands(ages: Any) -> np.ndarray:
    """Vectorised :func:`age_band` for a numpy array, pyarrow array or sequence of ints.

    Returns a numpy object array of band labels; nulls (pyarrow) or negative ages give None.
    """
    if isinstance(ages, (pa.Array, pa.ChunkedArray)):  # keep nulls as nulls
        mask = np.asarray(ages.is_null())
        values = np.asarray(ages.fill_null(0), dtype=np.int64)
        out = age_bands(values)
        out[mask] = None
        return out
    values = np.asarray(ages, dtype=np.int64)
    index = np.minimum(values // 5, len(AGE_BANDS) - 1)
    out = _AGE_BANDS_ARRAY[np.clip(index, 0, None)].copy()
    out[values < 0] = None
    return out


def age_band_sql(age_expr: str) -> str:
    """A portable SQL CASE expression (DuckDB and others) mapping ``age_expr`` to its band."""
    whens = " ".join(f"WHEN {age_expr} < {lo + 5} THEN '{band}'"
                     for lo, band in zip(range(0, AGE_TOP, 5), AGE_BANDS[:-1]))
    return (f"CASE WHEN {age_expr} IS NULL OR {age_expr} < 0 THEN NULL {whens} "
            f"ELSE '{AGE_BANDS[-1]}' END")


# --- code lists of the source systems -----------------------------------------------

SEX: dict[str, str] = {"1": "男", "2": "女"}

IDOU_TYPES: tuple[str, ...] = ("転入", "転出", "転居", "出生", "死亡", "職権記載")
REMOVAL_REASONS: tuple[str, ...] = ("転出", "死亡")

CERT_TYPES: tuple[str, ...] = ("1号", "2号", "3号")
FACILITY_TYPES: tuple[str, ...] = ("こども園", "公立幼稚園", "保育園", "保育所")

HOUSEHOLD_TYPES: tuple[str, ...] = ("単独", "夫婦のみ", "夫婦と子供", "ひとり親と子供", "三世代", "その他")

RELATIONSHIPS: tuple[str, ...] = (
    "世帯主", "妻", "夫", "子", "父", "母", "孫", "兄弟姉妹", "祖父", "祖母", "子の配偶者", "その他",
)

# --- municipalities people move from / to -------------------------------------------
# code (6 digits incl. check digit) -> (prefecture code, name). A selection, not the full
# list: Himeji's neighbours, the rest of 兵庫県's larger places, and the big cities that
# dominate Japanese internal migration. Every code is validated by lg_check_digit (tests).

MUNICIPALITIES: dict[str, tuple[str, str]] = {
    # 兵庫県: neighbours of Himeji
    "282103": ("28", "加古川市"),
    "282162": ("28", "高砂市"),
    "282294": ("28", "たつの市"),
    "282081": ("28", "相生市"),
    "282120": ("28", "赤穂市"),
    "282278": ("28", "宍粟市"),
    "284432": ("28", "福崎町"),
    "284645": ("28", "太子町"),
    "284424": ("28", "市川町"),
    "284467": ("28", "神河町"),
    # 兵庫県: elsewhere
    "281000": ("28", "神戸市"),
    "282031": ("28", "明石市"),
    "282022": ("28", "尼崎市"),
    "282049": ("28", "西宮市"),
    "282146": ("28", "宝塚市"),
    "282154": ("28", "三木市"),
    "282201": ("28", "加西市"),
    "282286": ("28", "加東市"),
    "282090": ("28", "豊岡市"),
    "283819": ("28", "稲美町"),
    "283827": ("28", "播磨町"),
    "284815": ("28", "上郡町"),
    "285013": ("28", "佐用町"),
    # other prefectures
    "271004": ("27", "大阪市"),
    "271403": ("27", "堺市"),
    "261009": ("26", "京都市"),
    "331007": ("33", "岡山市"),
    "332020": ("33", "倉敷市"),
    "131008": ("13", "東京都特別区部"),
    "141003": ("14", "横浜市"),
    "231002": ("23", "名古屋市"),
    "341002": ("34", "広島市"),
    "401307": ("40", "福岡市"),
    "011002": ("01", "札幌市"),
    "291013": ("29", "奈良市"),
    "302015": ("30", "和歌山市"),
    "312011": ("31", "鳥取市"),
    "372013": ("37", "高松市"),
    "382019": ("38", "松山市"),
    "471011": ("47", "那覇市"),
}
