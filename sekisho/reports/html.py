"""Executed notebook -> one self-contained HTML page (municipal networks have no internet).

nbconvert's ``basic`` template gives the cells' HTML only (no require.js, MathJax or
fonts from a CDN); we wrap it in our own page with inline CSS and plotly.js embedded
once, from the installed plotly package. :func:`external_loads` is the check that nothing
is fetched from elsewhere; publishing refuses a page that fails it.
"""

from __future__ import annotations

import re
from html import escape

import nbformat

PAGE_CSS = """
body { font-family: "Noto Sans CJK JP", "Noto Sans JP", "IPAexGothic", "Meiryo", sans-serif;
       margin: 0; color: #222; background: #fafafa; }
header.report { background: #27415e; color: #fff; padding: 1em 2em; }
header.report h1 { margin: 0 0 .3em 0; font-size: 1.5em; }
header.report dl { margin: 0; display: flex; flex-wrap: wrap; gap: .3em 2em; font-size: .9em; }
header.report dt { font-weight: bold; } header.report dd { margin: 0; }
main { padding: 1em 2em 3em 2em; max-width: 1300px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.25em; border-left: 6px solid #27415e; padding-left: .5em; margin-top: 2em; }
p.desc { color: #444; } p.note { color: #555; font-size: .85em; margin: .3em 0; }
div.tbl { max-height: 32em; overflow: auto; border: 1px solid #ddd; background: #fff; margin: .5em 0; }
table { border-collapse: collapse; font-size: .9em; }
th { position: sticky; top: 0; background: #e8eef5; border: 1px solid #ccc; padding: .25em .6em; white-space: nowrap; }
td { border: 1px solid #ddd; padding: .2em .6em; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.txt { text-align: left; }
tr.over td { background: #fde2e1; font-weight: bold; }
td.sup { color: #a00; font-weight: bold; }
.jp-OutputArea-output, .output_html { overflow-x: auto; }
"""

# <script src=//...>, <link href=https://...>, <img src=http...>, @import, url(https://...)
_EXTERNAL = re.compile(
    r"""<(?:script|link|img|iframe|source|video|audio|embed|object)\b[^>]*?\b(?:src|href|data)\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|@import\s+(?:url\()?\s*["']?\s*(?:https?:)?//"""
    r"""|url\(\s*["']?\s*(?:https?:)?//""",
    re.I,
)


def external_loads(html: str) -> list[str]:
    """Fragments of ``html`` that would load a script, style, font or image from elsewhere.

    plotly.js's own source mentions URLs in strings it never loads unless asked (geo maps,
    MathJax), so only markup and CSS loads are checked, outside the embedded library.
    """
    return [m.group(0)[:120] for m in _EXTERNAL.finditer(_without_plotlyjs(html))]


_PLOTLYJS_MARK = "<!-- plotly.js (embedded) -->"


def _without_plotlyjs(html: str) -> str:
    start = html.find(_PLOTLYJS_MARK)
    if start < 0:
        return html
    end = html.find("</script>", start)
    return html[:start] + html[end:]


def notebook_body(nb: nbformat.NotebookNode) -> str:
    """The notebook's outputs and markdown as HTML (code hidden, prompts hidden)."""
    from nbconvert import HTMLExporter

    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            # stream output (warnings, progress) is not part of a report
            cell.outputs = [o for o in cell.outputs if o.get("output_type") != "stream"]
    exporter = HTMLExporter(template_name="basic", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, anchor_link_text="")
    body, _ = exporter.from_notebook_node(nb)
    return body


def page(*, title: str, meta: list[tuple[str, str]], body: str) -> str:
    """A complete HTML page with plotly.js embedded once (from the installed package)."""
    from plotly.offline import get_plotlyjs

    plotlyjs = get_plotlyjs().replace("</script", "<\\/script")
    header = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in meta)
    return (
        '<!doctype html>\n<html lang="ja"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{PAGE_CSS}</style>\n"
        f'{_PLOTLYJS_MARK}<script type="text/javascript">window.PlotlyConfig = {{MathJaxConfig: "local"}};'
        f"{plotlyjs}</script>\n</head>\n<body>\n"
        f'<header class="report"><h1>{escape(title)}</h1><dl>{header}</dl></header>\n'
        f"<main>\n{body}\n</main>\n</body></html>\n"
    )
