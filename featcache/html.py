"""The pieces of featcache's HTML pages (a run's ``report.html``, a sweep's): escaping, number
formatting, tables, embedded PNGs, the page with its inline style. One self-contained file per
page: pictures as PNG data, style inline, nothing linked but other reports.
"""

from __future__ import annotations

import base64
import html

import numpy as np

__all__ = ["Html", "esc", "fmt", "table", "img", "page", "SORT_JS"]

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:3px 9px;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}tr.avg td{background:#fafafa;font-style:italic}tr.best td{background:#fff6d5;font-weight:600}
img{max-width:100%;height:auto}.note{background:#fff4e5;border-left:4px solid #f0a030;padding:.4em .8em;margin:.4em 0}
.held{background:#e9f6ec;border-left:4px solid #2e9b4f;padding:.6em 1em;margin:.6em 0}
.biased{background:#fdecea;border-left:4px solid #d9534f;padding:.6em 1em;margin:.6em 0}
.headline{font-size:1.25em}th.sort{cursor:pointer}th.sort:after{content:" \\2195";color:#999}"""

SORT_JS = """<script>document.querySelectorAll("table.sortable").forEach(function(t){
t.querySelectorAll("th").forEach(function(th,i){th.addEventListener("click",function(){
var b=t.tBodies[0],rows=Array.from(b.rows),up=th.dataset.up!=="1";th.dataset.up=up?"1":"0";
rows.sort(function(x,y){var a=x.cells[i].innerText,c=y.cells[i].innerText,p=parseFloat(a),q=parseFloat(c);
var r=(isNaN(p)||isNaN(q))?a.localeCompare(c):p-q;return up?r:-r});rows.forEach(function(r){b.appendChild(r)})})})})
</script>"""


def esc(v) -> str:
    return html.escape(str(v))


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


class Html(str):
    """A cell already written as HTML (a link)."""

    @property
    def html(self) -> str:
        return str(self)


def table(rows: list[list], head: list[str], classes: list[str] | None = None, sortable: bool = False) -> str:
    th = "".join(f'<th{" class=sort" if sortable else ""}>{esc(h)}</th>' for h in head)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="n">{esc(fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                        else f"<td>{c.html if isinstance(c, Html) else esc(fmt(c))}</td>" for c in r)
        body.append(f"<tr{cls}>{cells}</tr>")
    kind = " class=sortable" if sortable else ""
    return f'<table{kind}><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}" title="{esc(name)}"></figure>'


def page(title: str, body: str, script: str = "") -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>\n'
            f"<body>{body}{script}</body></html>\n")
