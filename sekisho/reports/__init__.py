"""Published reports (Himeji's list, table 3-17, plus the childcare overview).

* ``sekisho.reports.data``     -- the one door to data: guard-protected SQL -> DataFrame
* ``sekisho.reports.render``   -- section titles, tables (+ saved JSON), plotly figures
* ``sekisho.reports.mesh``     -- JIS X 0410 mesh maps drawn from the codes (no tile server)
* ``sekisho.reports.periods``  -- month arithmetic for 基準年月 / 比較年月 / 期間
* ``sekisho.reports.catalog``  -- which notebook holds which of the 37 items
* ``sekisho.reports.publish``  -- papermill -> nbconvert -> self-contained HTML, audited
* ``sekisho.reports.index``    -- the JSON index of published reports

The notebooks themselves live in ``reports/*.ipynb`` (``resource_dir("reports")``).
"""
