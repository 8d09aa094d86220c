"""HTML building blocks of the report pages (``sacv.report.build``, ``sacv.report.compare``): escaping, value
formatting, sortable tables and the self-contained page (inline CSS and script, nothing external)."""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def fmt(value) -> str:
    """Display text of one table value (escaped)."""
    if missing(value):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    return esc(value)


def sort_key(value) -> str:
    if missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    return esc(value)


def table_html(frame: pd.DataFrame, table_id: str, cells=None, row_class=None, headers: list[str] | None = None) -> str:
    """A sortable table of ``frame``; ``cells(row) -> [(sort key, html)]`` with ``headers`` overrides
    the generic cells (one per column); ``row_class(row)`` names a CSS class per row."""
    headers = headers if headers is not None else list(frame.columns)
    head = "".join(f'<th tabindex="0" scope="col">{esc(h)}</th>' for h in headers)
    body = []
    for _, row in frame.iterrows():
        items = cells(row) if cells else [(sort_key(v), fmt(v)) for v in row]
        klass = f' class="{row_class(row)}"' if row_class and row_class(row) else ""
        body.append(f"<tr{klass}>" + "".join(f'<td data-v="{k}">{v}</td>' for k, v in items) + "</tr>")
    return (
        f'<div class="scroll"><table class="sortable" id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def cut_note(shown: int, rows: int, table: str, order: str = "in the table's order") -> str:
    """The note above a table that shows only ``shown`` of its ``rows`` ("" when it is whole)."""
    if shown >= rows:
        return ""
    return f'<p class="note">Shown: {shown} of {rows} rows, {esc(order)}; all of them are in tables/{esc(table)}.parquet.</p>'


def html_page(title: str, body: str) -> str:
    """A whole self-contained page around ``body`` (HTML, already escaped); ``title`` is escaped here."""
    head, tail = PAGE.split("{body}")
    return head.replace("{title}", esc(title)) + body + tail


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1d2430;background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:1.6em;margin:.2em 0 .6em}h2{font-size:1.25em;margin:1.8em 0 .5em;border-bottom:2px solid #e3e6eb;padding-bottom:.2em}
h3{font-size:1.05em;margin:.2em 0}p{line-height:1.45}
table{border-collapse:collapse;font-size:.86em;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #e8eaee;text-align:left;vertical-align:top}
table.sortable th{background:#eef1f5;cursor:pointer;user-select:none;white-space:nowrap;position:sticky;top:0}
table.sortable th:hover{background:#dde3ea}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2";font-size:.8em}
table.sortable th[aria-sort=descending]::after{content:" \\25BC";font-size:.8em}
table.sortable tbody tr:nth-child(even){background:#fafbfc}
table.sortable tbody tr.sig{background:#e3f4e1;font-weight:600}table.sortable tbody tr.sig.neg{background:#fbe3e1}
table.sortable tbody tr.fail{background:#fde2e1;font-weight:600}
input.filter{margin:4px 0 8px;padding:4px 8px;width:320px;max-width:100%}
table.facts{width:auto}table.facts th{color:#5a6372;font-weight:600;padding-right:18px;white-space:nowrap}
table.facts td{word-break:break-all;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.95em}
.scroll{overflow-x:auto;max-height:560px;overflow-y:auto;border:1px solid #e3e6eb;border-radius:4px}
.ci{color:#6b7480;font-size:.9em}.path{color:#6b7480;font-size:.85em;word-break:break-all}
.note{background:#fff6e0;border-left:4px solid #e6a700;padding:6px 10px}
section.concept{border:1px solid #e3e6eb;border-radius:6px;padding:12px 16px;margin:16px 0}
.stats{color:#3c4654;margin:.3em 0 .6em}
.badge{font-size:.75em;padding:2px 8px;border-radius:10px;margin-left:6px;vertical-align:middle}
.badge.sig{background:#2e7d32;color:#fff}.badge.sig.neg{background:#b3261e}.badge.ns{background:#c9ced6;color:#1d2430}
figure{margin:10px 0}figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#3c4654;margin-top:4px}figcaption ul{margin:4px 0;padding-left:20px}
</style></head>
<body><main>
{body}
</main>
<script>
(function(){
  document.querySelectorAll("input.filter").forEach(function(box){
    var table=document.getElementById(box.getAttribute("data-table"));
    box.addEventListener("input",function(){var q=box.value.toLowerCase();
      Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
        r.style.display=r.textContent.toLowerCase().indexOf(q)<0?"none":"";});});
  });
  function key(td){var v=td.getAttribute("data-v");if(v===null)v=td.textContent;var n=Number(v);
    return v===""?[2,""]:(isNaN(n)?[1,v.toLowerCase()]:[0,n]);}
  function cmp(a,b){return a[0]-b[0]||(a[1]<b[1]?-1:a[1]>b[1]?1:0);}
  document.querySelectorAll("table.sortable").forEach(function(table){
    var heads=table.querySelectorAll("thead th");
    heads.forEach(function(th,i){
      function sort(){
        var asc=th.getAttribute("aria-sort")!=="ascending",body=table.tBodies[0];
        heads.forEach(function(h){h.removeAttribute("aria-sort");});
        th.setAttribute("aria-sort",asc?"ascending":"descending");
        var rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(x,y){var a=key(x.cells[i]),b=key(y.cells[i]);
          return a[0]===2||b[0]===2?a[0]-b[0]:(asc?1:-1)*cmp(a,b);});
        rows.forEach(function(r){body.appendChild(r);});
      }
      th.addEventListener("click",sort);
      th.addEventListener("keydown",function(e){if(e.key==="Enter"||e.key===" "){e.preventDefault();sort();}});
    });
  });
})();
</script>
</body></html>
"""
