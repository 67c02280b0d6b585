"""Mesh maps from JIS X 0410 codes, drawn without any map-tile server.

Standard area mesh cells are a regular grid in latitude/longitude (1km: 30" x 45";
500m and 250m halve and quarter it), so a map is a heatmap on lon/lat axes: jismesh
gives each cell's south-west corner, the cell's grid index follows from the level's
cell size, and the y axis is scaled by 1/cos(latitude) so cells look square.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: mesh column in the views -> (jismesh level, Japanese label)
LEVELS = {
    "mesh1km": (3, "1kmメッシュ"),
    "mesh500m": (4, "500mメッシュ"),
    "mesh250m": (5, "250mメッシュ"),
}
#: degrees of latitude / longitude per cell at each jismesh level
CELL_DEG = {3: (30 / 3600, 45 / 3600), 4: (15 / 3600, 22.5 / 3600), 5: (7.5 / 3600, 11.25 / 3600)}


def cell_grid(codes: pd.Series, level: int) -> pd.DataFrame:
    """South-west corner, centre and integer grid position of each mesh code."""
    import jismesh.utils as ju

    codes = codes.astype(str)
    bad = codes[codes.str.len() != {3: 8, 4: 9, 5: 10}[level]]
    if len(bad):
        raise ValueError(f"mesh codes of the wrong length for level {level}: {list(bad[:5])}")
    as_int = codes.astype("int64").to_numpy()
    if len(as_int) == 1:  # jismesh's vector path calls np.asscalar (gone in numpy 2) for one code
        lat, lon = ju.to_meshpoint(int(as_int[0]), 0.0, 0.0)
        lat0, lon0 = np.array([lat]), np.array([lon])
    else:
        lat0, lon0 = ju.to_meshpoint(as_int, 0.0, 0.0)
    dlat, dlon = CELL_DEG[level]
    grid = pd.DataFrame({"mesh": codes.to_numpy(), "lat0": lat0, "lon0": lon0})
    grid["row"] = np.rint((grid.lat0 - grid.lat0.min()) / dlat).astype(int)
    grid["col"] = np.rint((grid.lon0 - grid.lon0.min()) / dlon).astype(int)
    grid["lat"] = grid.lat0 + dlat / 2
    grid["lon"] = grid.lon0 + dlon / 2
    return grid


def mesh_figure(df: pd.DataFrame, mesh_column: str, value_column: str, *, title: str,
                value_label: str, diverging: bool = False):
    """A plotly figure of ``value_column`` per mesh cell.

    Rows whose value is missing (e.g. a derived value with a suppressed input) are drawn
    grey. Cells the guard withheld entirely (mesh codes have no public domain, so suppressed
    cells are dropped) are not drawn, exactly like cells where nobody lives.
    """
    import plotly.graph_objects as go

    level, level_label = LEVELS[mesh_column]
    data = df[[mesh_column, value_column]].dropna(subset=[mesh_column])
    fig = go.Figure()
    if data.empty:
        fig.update_layout(title=f"{title}（表示できるメッシュがありません）")
        return fig
    grid = cell_grid(data[mesh_column], level)
    grid["value"] = pd.to_numeric(data[value_column], errors="coerce").to_numpy()
    dlat, dlon = CELL_DEG[level]
    n_rows, n_cols = grid.row.max() + 1, grid.col.max() + 1
    lats = grid.lat0.min() + dlat * (np.arange(n_rows) + 0.5)
    lons = grid.lon0.min() + dlon * (np.arange(n_cols) + 0.5)

    values = np.full((n_rows, n_cols), np.nan)
    hidden = np.full((n_rows, n_cols), np.nan)
    text = np.full((n_rows, n_cols), "", dtype=object)
    for r in grid.itertuples():
        text[r.row, r.col] = r.mesh
        if math.isnan(r.value):
            hidden[r.row, r.col] = 1.0
        else:
            values[r.row, r.col] = r.value

    fig.add_trace(go.Heatmap(
        x=lons, y=lats, z=hidden, text=text, showscale=False, name="秘匿",
        colorscale=[[0, "#d0d0d0"], [1, "#d0d0d0"]],
        hovertemplate="メッシュ %{text}<br>秘匿<extra></extra>"))
    if diverging:
        bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        scale = dict(colorscale="RdBu_r", zmid=0, zmin=-bound, zmax=bound)
    else:
        scale = dict(colorscale="YlOrRd")
    fig.add_trace(go.Heatmap(
        x=lons, y=lats, z=values, text=text, name=value_label,
        colorbar=dict(title=dict(text=value_label)), **scale,
        hovertemplate=f"メッシュ %{{text}}<br>{value_label} %{{z:,}}<extra></extra>"))
    mid_lat = float(np.mean(lats))
    fig.update_layout(
        title=f"{title}（{level_label}）", height=620,
        xaxis=dict(title="経度", showgrid=False, constrain="domain"),
        yaxis=dict(title="緯度", showgrid=False, scaleanchor="x",
                   scaleratio=1 / math.cos(math.radians(mid_lat))),
        plot_bgcolor="#ffffff")
    return fig
