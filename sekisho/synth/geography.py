"""The synthetic city's geography: 13 blocks, about 900 町丁目, their 街区 and coordinates.

Place names are real Himeji town names grouped by the 地域ブロック they lie in, but the
丁目 counts, 街区 counts and coordinates are invented: block centroids are roughly where
the real blocks are, every 町丁目 of a base town sits near the others of that town, and
every town sits inside its block's disc, so 1 km / 500 m / 250 m meshes draw a sensible map.

The geography does not depend on the generator's seed: like the real public address data it
is the same for every synthetic population.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sekisho.reference import BLOCKS, CITY_CODE

GEOGRAPHY_SEED = 282014  # fixed: the address master is public data, the same for every run

FULLWIDTH_DIGITS = str.maketrans("0123456789", "０１２３４５６７８９")


@dataclass(frozen=True)
class BlockSpec:
    name: str
    lat: float           # rough centroid, WGS84
    lon: float
    radius_km: float     # towns are scattered within this radius of the centroid
    population_share: float
    towns: str           # "name:chome_count" separated by spaces; no count = no 丁目


# Population shares are plausible, not official: the central and coastal blocks are the
# large ones, 家島 (islands, 34.67N 134.53E) and 安富 (northern mountains) the small ones.
BLOCK_SPECS: tuple[BlockSpec, ...] = (
    BlockSpec("安富", 35.010, 134.620, 3.0, 0.010,
              "安富町安志 安富町名坂 安富町三森 安富町狭戸 安富町植木野 安富町長野 安富町関 "
              "安富町末広 安富町皆河 安富町塩野 安富町詰 安富町富栄 安富町瀬川 安富町栃原 "
              "安富町川坂 安富町鹿畑"),
    BlockSpec("家島", 34.672, 134.530, 2.0, 0.010,
              "家島町真浦 家島町宮 家島町坊勢 家島町西島 家島町男鹿島"),
    BlockSpec("広畑", 34.790, 134.625, 2.0, 0.095,
              "広畑区夢前町:3 広畑区正門通:4 広畑区東夢前台:4 広畑区西夢前台:8 広畑区才:5 "
              "広畑区北野町:2 広畑区小坂:4 広畑区高浜町:4 広畑区蒲田:5 広畑区早瀬町:3 "
              "広畑区則直:3 広畑区西蒲田 広畑区鶴町:2 広畑区本町:6 広畑区吾妻町:3 広畑区清水町:3 "
              "広畑区大町:3 広畑区京見町 広畑区東新町:3 広畑区富士町 広畑区長町:2 広畑区小松町:4 "
              "広畑区八幡:3 広畑区城山町 広畑区末広町:3 広畑区西夢前台北:2 広畑区東夢前台南:2 "
              "広畑区蒲田東:2 広畑区正門通南:3 広畑区才東:2"),
    BlockSpec("香寺", 34.910, 134.720, 3.5, 0.040,
              "香寺町中仁野 香寺町犬飼 香寺町須加院 香寺町溝口 香寺町土師 香寺町香呂 香寺町中屋 "
              "香寺町田野 香寺町岩部 香寺町相坂 香寺町奥須加院 香寺町恒屋 香寺町行重 香寺町広瀬 "
              "香寺町矢田部 香寺町久畑 香寺町八徳山 香寺町中寺 香寺町実法寺 香寺町野田 "
              "香寺町香呂台:3 香寺町須加院台:3 香寺町溝口台:2 香寺町中仁野台:3 香寺町土師台:2"),
    BlockSpec("飾磨", 34.790, 134.665, 2.2, 0.120,
              "飾磨区玉地:3 飾磨区阿成:4 飾磨区今在家:7 飾磨区英賀 飾磨区英賀保駅前町 飾磨区細江:5 "
              "飾磨区構:5 飾磨区須加:4 飾磨区清水:3 飾磨区中島:3 飾磨区三宅:3 飾磨区恵美酒 "
              "飾磨区加茂:4 飾磨区野田:3 飾磨区付城:2 飾磨区妻鹿:5 飾磨区山崎 飾磨区下野田:4 "
              "飾磨区思案橋 飾磨区天神 飾磨区若宮町 飾磨区高町:2 飾磨区城南町:3 飾磨区大浜 "
              "飾磨区英賀東町:2 飾磨区英賀西町:2 飾磨区英賀宮町:2 飾磨区英賀春日町:2 "
              "飾磨区英賀清水町:3 飾磨区英賀甲 飾磨区英賀宮台 飾磨区上野田:6 飾磨区矢倉町:2 "
              "飾磨区蓼野町 飾磨区宮 飾磨区中浜町:2 飾磨区亀山 飾磨区阿成植木 飾磨区阿成渡場 "
              "飾磨区阿成下垣内 飾磨区西浜町:3 飾磨区妻鹿常盤町 飾磨区今在家北:2 飾磨区宝来 "
              "飾磨区須加北:3 飾磨区細江北:2 飾磨区加茂東:2"),
    BlockSpec("西部", 34.828, 134.630, 2.5, 0.080,
              "青山:6 青山北:3 青山西:5 青山南:4 大津区天神町:2 大津区平松 大津区勘兵衛町:4 "
              "大津区大津町:4 大津区新町:2 大津区西土井 大津区恵美酒町:2 大津区吉美 大津区長松 "
              "大津区真砂町 勝原区丁 勝原区熊見 勝原区宮田 勝原区大谷 勝原区朝日谷 勝原区下太田 "
              "勝原区山戸 太市中 相野 打越 下太田 林田町林田 林田町上構 林田町下伊勢 林田町口佐見 "
              "林田町松山 林田町六九谷 林田町中構 林田町新町 林田町八幡 林田町大堤 林田町山田 "
              "林田町上伊勢 林田町奥佐見 林田町下構 林田町中山 実法寺 西脇 田井台:2 石倉 "
              "勝原区勝原町:3 大津区大津町北:2"),
    BlockSpec("中部第一", 34.838, 134.690, 1.6, 0.120,
              "本町 白銀町 二階町 西二階町 紺屋町 竪町 龍野町:6 北条口:5 坂田町 忍町 五軒邸:4 "
              "城北新町:3 城北本町 城東町 野里 八代 八代本町:2 八代東光町 八代宮前町 十二所前町 "
              "総社本町 博労町 材木町 大黒壱丁町 増位本町:2 増位新町:2 城見台:3 新在家中の町 "
              "新在家本町:6 東雲町:6 景福寺前 西八代町 山野井町 福中町 千代田町 岡町 幸町 "
              "西駅前町 駅前町 北八代:2 光源寺前町 白国:5 船丘町 坊主町 大野町 "
              "八代緑ケ丘町 鷺山:2 神屋町:6 下寺町 元塩町 久保町 東今宿:6 西今宿:8 今宿 "
              "北平野:6 北平野南の町 北平野台町 新在家:4 南新在家 北今宿:3 "
              "楠町 野里東町 野里上野町:2 野里寺町 野里慶雲寺前町 野里梅ケ枝町 五軒屋町 "
              "城北:3 八代本町北:2"),
    BlockSpec("中部第二", 34.815, 134.692, 1.6, 0.130,
              "南町 東延末:5 西延末 南畝町:2 北条:2 延末:3 中地:4 中地南町 安田:4 朝日町 東駅前町 "
              "神田町:4 南駅前町 南今宿 手柄:2 伊伝居:3 大日町 東郷町 東辻井:4 西辻井 "
              "福居町 琴岡町 生野町 中島:3 南条:2 北条梅原町 北条宮の町 北条永良町 豊沢町 "
              "平野町 国府寺町 呉服町 鍛冶町 小姓町 塩町 綿町 福本町 河間町 直養町 "
              "高尾町 庄田 南八代町 小利木町 亀山:2 市之郷町:4 西中島 "
              "土山:7 土山東の町 辻井:9 西庄 新在家南町 上手野 下手野:6 岩端町 山吹:2 "
              "安田北:2 手柄山:2 延末南:2"),
    BlockSpec("東部", 34.835, 134.748, 2.5, 0.100,
              "御国野町国分寺 御国野町御着 御国野町深志野 御国野町西御着 御国野町東御着 "
              "四郷町本郷 四郷町坂元 四郷町東阿保 四郷町山脇 四郷町中鈴 四郷町上鈴 四郷町明田 "
              "四郷町見野 花田町一本松 花田町小川 花田町加納原田 花田町上原田 花田町高木 "
              "花田町勅旨 別所町佐土:3 別所町北宿 別所町別所:2 別所町佐土新 別所町小林 "
              "別所町家具町 阿保:5 阿保甲 市川台:3 北原:3 奥山:2 豊富町御蔭 豊富町豊富 豊富町神谷 "
              "豊富町甲丘:4 香呂町 船津町 山田町多田 山田町西山田 山田町北山田 "
              "山田町南山田 山田町牧野 山田町谷 飾東町庄 飾東町豊国 飾東町夕陽ケ丘:2 "
              "飾東町佐良和 飾東町北野 飾東町塩崎 飾東町志吹 飾東町八重畑 飾東町山崎 "
              "飾東町小原 飾東町唐端新 飾東町清住 飾東町大釜 飾東町大釜新 飾東町森 "
              "北平野奥垣内 御国野町御着北:2 市川台東:2"),
    BlockSpec("灘", 34.778, 134.745, 2.3, 0.090,
              "白浜町:6 八家:4 木場:5 的形町的形 的形町福泊 大塩町:4 大塩町汐咲:3 大塩町宮前 "
              "糸引:3 東山:2 兼田:3 南八代 木場前七軒町 木場十三軒町 白浜町宇佐崎北:3 "
              "白浜町宇佐崎中:3 白浜町宇佐崎南:2 白浜町寺家:2 白浜町神田:2 白浜町灘浜 "
              "白浜町甲 白浜町乙 的形町小赤壁 大塩町天満 木場前中町 八家前浜 "
              "白浜町松原:3 大塩町北:3 八家東:2 東山南:2"),
    BlockSpec("北部", 34.870, 134.680, 2.8, 0.080,
              "書写:4 田寺:8 田寺東:4 田寺山手町 広峰:2 砥堀:3 仁豊野 辻井北 岩端北 "
              "刀出:2 置塩 書写台:3 六角 黒川 玉手:4 峰南町 菅生台 "
              "増位山 書写東坂 書写西坂 白国北 広嶺山 西中島北 峰相 峰相北 石倉北 相野北 "
              "西脇北 田寺西:2 北八代北 野里北 砥堀南:2 仁豊野南:2 書写東:2 書写西:2"),
    BlockSpec("夢前", 34.930, 134.640, 4.0, 0.038,
              "夢前町前之庄 夢前町宮置 夢前町古知之庄 夢前町菅生澗 夢前町置本 夢前町山之内 "
              "夢前町莇野 夢前町寺 夢前町新庄 夢前町又坂 夢前町戸倉 夢前町神種 夢前町杉之内 "
              "夢前町塩田 夢前町護持 夢前町糸田 夢前町玉田 夢前町高長 夢前町清野 夢前町直谷 "
              "夢前町明神 夢前町芦田 夢前町野畑 夢前町下村 夢前町荒神 夢前町前之庄台:3 夢前町宮置台:2"),
    BlockSpec("網干", 34.784, 134.585, 2.2, 0.087,
              "網干区新在家:6 網干区浜田:2 網干区余子浜:2 網干区和久:6 網干区垣内中町:2 網干区垣内本町:6 "
              "網干区高田:2 網干区興浜:3 網干区津市場:2 網干区大江島:7 網干区田井:4 網干区北新在家:2 "
              "網干区宮内:2 網干区福井:4 網干区坂出:3 網干区新妻 網干区大津茂 網干区垣内東町:3 "
              "網干区垣内南町:3 網干区垣内北町:3 網干区垣内西町:2 網干区大江島古川町:2 "
              "網干区大江島寺前町:2 網干区網干浜 網干区坂上 網干区和久南:2 網干区興浜北:2 "
              "網干区大江島北:3 網干区新在家東:2"),
)


@dataclass(frozen=True)
class Geography:
    """Arrays describing every 町丁目 and 街区 (indexes are positions in these arrays)."""

    chome_code: np.ndarray      # str, city code + 4 digits
    chome_name: np.ndarray      # str
    chome_block: np.ndarray     # int index into BLOCKS
    chome_gaiku_count: np.ndarray  # int, gaiku are numbered 1..count
    chome_weight: np.ndarray    # float, relative number of households within its block
    chome_lat: np.ndarray
    chome_lon: np.ndarray
    gaiku_chome: np.ndarray     # int index into the chome arrays, one row per (chome, gaiku)
    gaiku_no: np.ndarray        # int
    gaiku_lat: np.ndarray
    gaiku_lon: np.ndarray
    block_share: np.ndarray     # population share per block (sums to 1)
    block_lat: np.ndarray
    block_lon: np.ndarray

    @property
    def n_chome(self) -> int:
        return len(self.chome_code)

    def chome_of_block(self, block: int) -> np.ndarray:
        return np.flatnonzero(self.chome_block == block)


def _parse_towns(spec: str) -> list[tuple[str, int]]:
    towns: list[tuple[str, int]] = []
    seen: set[str] = set()
    for item in spec.split():
        name, _, count = item.partition(":")
        if name in seen:
            raise ValueError(f"town {name!r} listed twice")
        seen.add(name)
        towns.append((name, int(count) if count else 0))
    return towns


def _km_to_deg(lat: float) -> tuple[float, float]:
    """Degrees of latitude and longitude per kilometre at ``lat``."""
    return 1 / 110.95, 1 / (111.32 * np.cos(np.radians(lat)))


def build_geography() -> Geography:
    """Build the (seed-independent) 町丁目 / 街区 geography of the synthetic city."""
    rng = np.random.default_rng(GEOGRAPHY_SEED)
    codes, names, blocks, gaiku_counts, weights, lats, lons = [], [], [], [], [], [], []
    serial = 0
    for block_index, spec in enumerate(BLOCK_SPECS):
        assert spec.name == BLOCKS[block_index], "BLOCK_SPECS must follow reference.BLOCKS order"
        dlat, dlon = _km_to_deg(spec.lat)
        urban = spec.radius_km <= 2.5
        for town, chome_count in _parse_towns(spec.towns):
            # town centre: uniform in the block's disc
            r = spec.radius_km * np.sqrt(rng.random())
            theta = rng.random() * 2 * np.pi
            town_lat = spec.lat + r * np.sin(theta) * dlat
            town_lon = spec.lon + r * np.cos(theta) * dlon
            suffixes = [""] if chome_count == 0 else [
                f"{i}丁目".translate(FULLWIDTH_DIGITS) for i in range(1, chome_count + 1)]
            for k, suffix in enumerate(suffixes):
                serial += 1
                codes.append(f"{CITY_CODE}{serial:04d}")
                names.append(town + suffix)
                blocks.append(block_index)
                # urban chome are small and dense; rural 大字 larger with more 街区
                gaiku_counts.append(int(rng.integers(4, 16) if urban else rng.integers(6, 26)))
                weights.append(float(rng.gamma(2.0, 1.0)))
                # consecutive 丁目 of one town line up about 350 m apart
                step = 0.35 * k
                lats.append(town_lat + step * np.sin(theta + 1.3) * dlat + rng.normal(0, 0.08) * dlat)
                lons.append(town_lon + step * np.cos(theta + 1.3) * dlon + rng.normal(0, 0.08) * dlon)

    chome_lat = np.array(lats)
    chome_lon = np.array(lons)
    chome_block = np.array(blocks, dtype=np.int64)
    gaiku_count = np.array(gaiku_counts, dtype=np.int64)
    gaiku_chome = np.repeat(np.arange(len(codes)), gaiku_count)
    gaiku_no = np.concatenate([np.arange(1, c + 1) for c in gaiku_count])
    # 街区 centroids within ~150 m (urban) / ~400 m (rural) of their 町丁目 centroid
    spread_km = np.where(np.array([BLOCK_SPECS[b].radius_km <= 2.5 for b in chome_block]), 0.15, 0.4)
    dlat_all = 1 / 110.95
    dlon_all = 1 / (111.32 * np.cos(np.radians(chome_lat)))
    g_spread = spread_km[gaiku_chome]
    gaiku_lat = chome_lat[gaiku_chome] + rng.normal(0, 1, len(gaiku_chome)) * g_spread * dlat_all
    gaiku_lon = chome_lon[gaiku_chome] + rng.normal(0, 1, len(gaiku_chome)) * g_spread * dlon_all[gaiku_chome]

    shares = np.array([s.population_share for s in BLOCK_SPECS])
    return Geography(
        chome_code=np.array(codes), chome_name=np.array(names), chome_block=chome_block,
        chome_gaiku_count=gaiku_count, chome_weight=np.array(weights),
        chome_lat=chome_lat, chome_lon=chome_lon,
        gaiku_chome=gaiku_chome, gaiku_no=gaiku_no,
        gaiku_lat=np.round(gaiku_lat, 6), gaiku_lon=np.round(gaiku_lon, 6),
        block_share=shares / shares.sum(),
        block_lat=np.array([s.lat for s in BLOCK_SPECS]),
        block_lon=np.array([s.lon for s in BLOCK_SPECS]),
    )
