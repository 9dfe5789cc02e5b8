"""The static report: the dashboard's views as one self-contained HTML file.

- plotly.js is inlined once; figures are JSON data (``<script type="application/json">``, with
  ``<``, ``>`` and ``&`` escaped) drawn by one small script of ours, so the file opens from disk
  with no network;
- every piece of text from a study goes through :func:`html.escape`; a Content-Security-Policy
  allows only our own two scripts (by hash) and no connections at all, so even text that escaped
  escaping could not run or fetch anything;
- a study run with several seeds per configuration gets a per-configuration table (mean ± sample
  std and n), and its figures draw the means with error bars (see :mod:`._figures`);
- the trial table sorts (click a header) and filters (text box, family and state menus) in the
  page; clicking a point or a row opens the trial's detail (per-layer FLOPs, coverage heatmaps,
  intervals) when the report holds it: every completed trial up to ``max_details``, else the
  families' front trials.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import html
import math
from typing import Any, Dict, List, Optional, Sequence

from . import _data, _figures

__all__ = ["render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1500px;padding:0 18px 40px;color:#222}
h1{font-size:1.5em;margin:18px 0 4px} h2{font-size:1.2em;margin:26px 0 6px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:1.05em;margin:14px 0 4px} .muted{color:#666;font-size:.9em}
.row{display:flex;flex-wrap:wrap;gap:12px} .row>.cell{flex:1 1 560px;min-width:420px}
.fig{min-height:200px} table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top} th{background:#f4f4f4}
#trials-table th{cursor:pointer;user-select:none;position:sticky;top:0}
#trials-table td.reason{max-width:420px;white-space:pre-wrap;word-break:break-word}
#trials-table tr.has-detail{cursor:pointer} #trials-table tr.has-detail:hover{background:#fff6d6}
.scroll{max-height:520px;overflow:auto;border:1px solid #eee} .best{font-weight:600;background:#eef7ee}
.controls{margin:6px 0;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
.state-FAIL{color:#b00} .state-PRUNED,.state-WAITING{color:#888} .error{color:#b00}
.layers{display:flex;flex-wrap:wrap;gap:12px} .layers>div{flex:1 1 420px}
"""

_JS = r"""
(function () {
  "use strict";
  function figData(id) { return JSON.parse(document.getElementById(id).textContent); }
  function render(div) {
    if (div.getAttribute("data-done")) { return; }
    div.setAttribute("data-done", "1");
    var fig = figData(div.getAttribute("data-fig"));
    Plotly.newPlot(div, fig.data, fig.layout, {responsive: true, displaylogo: false}).then(function (gd) {
      gd.on("plotly_click", function (ev) {
        var cd = ev.points && ev.points[0] && ev.points[0].customdata;
        if (cd && cd.length === 2) { showTrial(cd[0] + ":" + cd[1]); }
      });
    });
  }
  var select = document.getElementById("trial-select");
  var missing = document.getElementById("detail-missing");
  function showTrial(id) {
    var found = null;
    document.querySelectorAll(".trial-detail").forEach(function (section) {
      var match = section.getAttribute("data-trial") === id;
      section.hidden = !match;
      if (match) { found = section; }
    });
    if (!found) {
      missing.hidden = false;
      missing.textContent = "Trial " + id.split(":")[1] + ": its detail is not in this report " +
        "(it holds the completed trials, or only the front trials of big studies).";
      return;
    }
    missing.hidden = true;
    if (select) { select.value = id; }
    found.querySelectorAll(".fig").forEach(render);
    document.getElementById("detail").scrollIntoView({behavior: "auto", block: "start"});
  }
  if (select) { select.addEventListener("change", function () { if (select.value) { showTrial(select.value); } }); }
  document.querySelectorAll(".fig[data-main]").forEach(render);

  // trial table: sort on header click, filter by text, family and state
  var table = document.getElementById("trials-table");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  rows.forEach(function (row) {
    if (row.classList.contains("has-detail")) {
      row.addEventListener("click", function () { showTrial(row.getAttribute("data-trial")); });
    }
  });
  var direction = {};
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
    th.addEventListener("click", function () {
      direction[column] = -(direction[column] || -1);
      var d = direction[column];
      rows.sort(function (a, b) {
        var x = a.cells[column].getAttribute("data-v"), y = b.cells[column].getAttribute("data-v");
        var nx = parseFloat(x), ny = parseFloat(y);
        if (x === "" && y !== "") { return 1; }
        if (y === "" && x !== "") { return -1; }
        if (!isNaN(nx) && !isNaN(ny)) { return d * (nx - ny); }
        return d * x.localeCompare(y);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  var text = document.getElementById("filter-text");
  var family = document.getElementById("filter-family");
  var state = document.getElementById("filter-state");
  var count = document.getElementById("filter-count");
  function filter() {
    var needle = text.value.toLowerCase(), shown = 0;
    rows.forEach(function (row) {
      var ok = (!needle || row.textContent.toLowerCase().indexOf(needle) >= 0) &&
               (!family.value || row.getAttribute("data-family") === family.value) &&
               (!state.value || row.getAttribute("data-state") === state.value);
      row.hidden = !ok;
      if (ok) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " trials";
  }
  [text, family, state].forEach(function (el) { el.addEventListener("input", filter); });
  filter();
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else ""
    return "" if value is None else str(value)


class _Figures:
    """Collects figure JSON blobs and hands out their element ids."""

    def __init__(self) -> None:
        self.blobs: List[str] = []

    def div(self, fig, main: bool = True) -> str:
        fig_id = f"fig-{len(self.blobs)}"
        self.blobs.append(f'<script type="application/json" id="{fig_id}">{_figures.figure_json(fig)}</script>')
        return f'<div class="fig"{" data-main" if main else ""} data-fig="{fig_id}"></div>'


def _table(rows: Sequence[Dict[str, Any]], columns: Sequence[str], attrs: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_value_text(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _budget_section(views, spec) -> str:
    parts = []
    for view in views:
        if view.error:
            continue
        try:
            rows = _figures.budget_rows(view, spec)
        except Exception as error:  # noqa: BLE001 - one odd study must not stop the report
            parts.append(f'<div class="cell"><h3>{_e(view.label)}</h3><p class="muted">the budget table could '
                         f"not be computed ({_e(type(error).__name__)}: {_e(str(error)[:200])})</p></div>")
            continue
        if not rows:
            continue
        columns = [f"<= {b:g}" for b in spec.budgets]
        best = _figures.best_cells(rows, spec.budgets)
        head = "<th>family</th>" + "".join(f"<th>{_e(spec.axes.x)} {_e(c)}</th>" for c in columns)
        body = ""
        for row in rows:
            cells = "".join(
                f'<td class="{"best" if best[c] == row["family"] else ""}">{_e(_figures.budget_cell_text(row[c]))}</td>'
                for c in columns)
            body += f"<tr><td>{_e(row['family'])}</td>{cells}</tr>"
        heading = f"{view.label}: best {_data.metric_title(spec.axes.y, view)}"
        parts.append(f'<div class="cell"><h3>{_e(heading)}</h3><table class="budget-table">'
                     f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
    return f'<div class="row">{"".join(parts)}</div>' if parts else '<p class="muted">No completed trials.</p>'


def _configurations_section(views, spec) -> str:
    """The per-configuration table (mean ± spread and n), for studies run with several seeds."""
    rows, columns = _figures.configuration_table(views, spec)
    if not rows:
        return ""
    return (f'<h2 id="configurations">Configurations over seeds</h2><p class="muted">{_e(_figures.SEEDS_NOTE)}</p>'
            f'<div class="scroll">{_table(rows, columns, " id=configurations-table")}</div>')


def _trials_section(views, spec, detailed: set) -> str:
    rows: List[Dict[str, Any]] = []
    notes = []
    for view in views:
        if not view.error:
            try:
                mine, sampled = _data.sampled_trial_rows(view, spec.axes.x, spec.axes.y, spec.families,
                                                         spec.max_points)
            except Exception:  # noqa: BLE001 - its figures say what is wrong; the other studies' rows stay
                continue
            rows += mine
            if sampled is not None:
                notes.append(f"{view.label}: " + sampled.note(
                    "trials off the fronts", "every front member shown; gsmsearch export writes every trial"))
    if not rows:
        return '<p class="muted">No trials.</p>'
    note = "".join(f'<p class="muted sample-note">{_e(text)}</p>' for text in notes)
    columns = list(dict.fromkeys(c for row in rows for c in row if c != "id"))
    # the failure reason last, parameters before it
    columns = [c for c in columns if c != "failure reason"] + ["failure reason"]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    lines = []
    for row in rows:
        cls = "has-detail" if row["id"] in detailed else ""
        cells = []
        for c in columns:
            value = row.get(c)
            text = _value_text(value)
            sort_value = repr(value) if isinstance(value, float) else text
            extra = ' class="reason"' if c == "failure reason" else (f' class="state-{_e(text)}"' if c == "state" else "")
            cells.append(f'<td{extra} data-v="{_e(sort_value)}">{_e(text)}</td>')
        lines.append(f'<tr class="{cls}" data-trial="{_e(row["id"])}" data-family="{_e(row["family"])}" '
                     f'data-state="{_e(row["state"])}">{"".join(cells)}</tr>')
    families = sorted({row["family"] for row in rows}, key=_data.family_sort_key)
    states = sorted({row["state"] for row in rows})
    options = lambda values: "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in values)  # noqa: E731
    return note + (
        '<div class="controls"><input id="filter-text" type="search" placeholder="filter rows (any text)"> '
        f'<select id="filter-family"><option value="">all families</option>{options(families)}</select> '
        f'<select id="filter-state"><option value="">all states</option>{options(states)}</select> '
        '<span id="filter-count" class="muted"></span></div>'
        f'<div class="scroll"><table id="trials-table"><thead><tr>{head}</tr></thead>'
        f'<tbody>{"".join(lines)}</tbody></table></div>'
        '<p class="muted">Click a header to sort; click a highlighted row (or a point in a figure) for the '
        "trial's structure.</p>"
    )


def _detail_trials(view, spec, max_details: int) -> List[Any]:
    """The trials whose detail the report holds, with every attribute they recorded."""
    complete = [r for r in view.records if r.state == "COMPLETE" and view.has_layers(r)
                and (spec.families is None or r.family in spec.families)]
    if len(complete) <= max_details:
        return view.detailed(complete)
    records, spreads = _data.drawn_records(view.records, spec.axes.x, spec.axes.y, view.metric_names)
    points = _data.family_points(records, spec.axes.x, spec.axes.y, view.metric_names, spec.families)
    front = {p.number for ps in points.values() for p in ps if p.status == "front"}
    # a front configuration's first trial (the one its point opens) first, then its other seeds
    others = {n for number in front if number in spreads for n, *_ in spreads[number].seeds} - front
    chosen = [r for r in complete if r.number in front] + [r for r in complete if r.number in others]
    return view.detailed(chosen[:max_details])


def trial_detail_html(view, record, spec, figures: _Figures, max_cells: int = 96) -> str:
    """One trial's detail: metrics and configuration, FLOPs per layer, and for each GBLR layer
    its coverage heatmap and component intervals."""
    result = record.user_attrs.get("result") or {}
    facts = [{"key": "state", "value": record.state}, {"key": "family", "value": record.family},
             {"key": "feasible", "value": "yes" if record.feasible else "no"}]
    facts += [{"key": _data.metric_title(m, view), "value": _value_text(_data.metric_value(record, m, view.metric_names))}
              for m in dict.fromkeys(list(view.metric_names) + [spec.axes.y, spec.axes.x])]
    title, other = _data.other_split_quality(record, view)
    facts.append({"key": title, "value": _value_text(other)})  # recorded beside the objective, never selected on
    for key in ("params", "dense_params", "latency_ms", "dense_latency_ms", "train_seconds", "epochs_run"):
        if key in result:
            facts.append({"key": key, "value": _value_text(result[key])})
    facts += [{"key": k, "value": _figures._fmt(v)} for k, v in _data.config_summary(record).items()]
    if record.failure_reason:
        facts.append({"key": "failure reason", "value": record.failure_reason})
    parts = [f"<h3>{_e(view.label)}: trial {record.number} ({_e(record.family or 'no family')})</h3>",
             '<div class="row"><div class="cell" style="flex:0 1 380px;min-width:300px">',
             _table(facts, ["key", "value"], ' class="facts"'), "</div>",
             f'<div class="cell">{figures.div(_figures.layer_flops_figure(record), main=False)}</div></div>']
    layers = _figures.structure_layers(record)
    notes = _figures.structure_notes(record)
    if layers:
        parts.append('<h3>Learned structure (components covering each weight entry)</h3><div class="layers">')
        for name, layer in layers:
            intervals = _figures.interval_rows(layer)
            columns = ["component", "rows", "row length", "columns", "column length", "entries"]
            parts.append(f"<div>{figures.div(_figures.coverage_figure(name, layer, max_cells), main=False)}"
                         f"<details><summary>{len(layer.get('intervals') or [])} component interval(s) of "
                         f"{_e(name)}</summary>{_table(intervals, columns, ' class=intervals')}</details></div>")
        parts.append("</div>")
    elif record.user_attrs.get("layers") and not notes:
        parts.append('<p class="muted">Hand-crafted structure: its layers are listed above; the coverage '
                     "heatmap is drawn for learned (GBLR) layers.</p>")
    if notes:
        parts.append('<div class="structure-notes muted">Not drawn from this trial\'s recorded layers:<ul>'
                     + "".join(f"<li>{_e(note)}</li>" for note in notes) + "</ul></div>")
    return (f'<section class="trial-detail" data-trial="{_e(view.key)}:{record.number}" hidden>'
            + "".join(parts) + "</section>")


def _safe_detail_html(view, record, spec, figures: _Figures) -> str:
    """:func:`trial_detail_html`, or a note saying why the trial's detail cannot be shown."""
    kept = len(figures.blobs)
    try:
        return trial_detail_html(view, record, spec, figures)
    except Exception as error:  # noqa: BLE001
        del figures.blobs[kept:]
        return (f'<section class="trial-detail" data-trial="{_e(view.key)}:{record.number}" hidden>'
                f"<h3>{_e(view.label)}: trial {record.number} ({_e(record.family or 'no family')})</h3>"
                f'<p class="muted">This trial\'s detail could not be shown ({_e(type(error).__name__)}: '
                f"{_e(str(error)[:200])}).</p></section>")


def _pareto_sample_notes(views, spec) -> str:
    """Per study whose dominated and infeasible points are sampled in the front figures: how
    (the figures say it too)."""
    notes = []
    for view in views:
        if view.error:
            continue
        try:
            records, spreads = _data.drawn_records(view.records, spec.axes.x, spec.axes.y, view.metric_names)
            points = _data.family_points(records, spec.axes.x, spec.axes.y, view.metric_names, spec.families)
            _, sampled = _data.sample_points(points, spec.max_points)
        except Exception:  # noqa: BLE001 - its figures say what is wrong
            continue
        if sampled is not None:
            notes.append(f"{view.label}: {_figures.sample_text(sampled, spreads)} (the fronts, hypervolumes and "
                         f"budget table are computed from every trial).")
    return "".join(f'<p class="muted sample-note">{_e(text)}</p>' for text in notes)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def render_report(views, spec, *, max_details: int = 80, generated: Optional[str] = None) -> str:
    """The report as one HTML string (see the module docstring)."""
    from plotly.offline import get_plotlyjs

    figures = _Figures()
    generated = generated or datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    summary = []
    for view in views:
        if view.error:
            summary.append(f'<li class="error">{_e(view.label)}: {_e(view.error)}</li>')
            continue
        states: Dict[str, int] = {}
        for r in view.records:
            states[r.state] = states.get(r.state, 0) + 1
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "no trials"
        workload = (view.spec.get("workload") or {}).get("name") if isinstance(view.spec.get("workload"), dict) else None
        summary.append(f"<li><b>{_e(view.label)}</b> (study {_e(view.name)}, {_e(view.storage)})"
                       f"{': ' + _e(workload) if workload else ''}: {_e(counts)}; {_e(_data.split_note(view))}</li>")

    def per_study(kind: str, make) -> str:
        cells = "".join(f'<div class="cell" id="{kind}-{_e(v.key)}">{figures.div(_figures.safe_figure(make, v, spec))}'
                        "</div>" for v in views)
        return f'<div class="row">{cells}</div>'

    pareto = per_study("pareto", _figures.pareto_figure)
    compare = per_study("compare", _figures.comparison_figure)
    hypervolume = per_study("hypervolume", _figures.hypervolume_figure)
    details, options, detailed = [], [], set()
    for view in views:
        if view.error:
            continue
        try:
            chosen = _detail_trials(view, spec, max_details)
        except Exception:  # noqa: BLE001 - its figures say what is wrong
            chosen = []
        for record in chosen:
            details.append(_safe_detail_html(view, record, spec, figures))
            detailed.add(f"{view.key}:{record.number}")
            options.append(f'<option value="{_e(view.key)}:{record.number}">{_e(view.label)}: trial '
                           f"{record.number} ({_e(record.family or 'no family')})</option>")
    ref = spec.reference
    body = f"""
<h1>{_e(spec.title)}</h1>
<p class="muted">gsmsearch report, {_e(generated)}. Quality: {_e(spec.axes.y)}; cost: {_e(spec.axes.x)};
hypervolume reference point x={ref.x:g}, y={ref.y:g} for every family.</p>
<ul id="studies">{''.join(summary)}</ul>
<h2 id="pareto">Pareto fronts per family</h2>
<p class="muted">Bright: each family's front (feasible, non-dominated); dimmed: dominated; crosses: infeasible.
Dotted line: the dense model's cost. Hover for a trial's configuration, click for its structure.</p>
{_pareto_sample_notes(views, spec)}
{pareto}
<h2 id="compare">GBLR against each hand-crafted family</h2>
{compare}
<h2 id="hypervolume">Hypervolume</h2>
{hypervolume}
<h2 id="budgets">Best quality at a budget</h2>
<p class="muted">Per family, the best feasible trial (configuration, by its mean, where seeds repeat) with
{_e(spec.axes.x)} at most the budget (best per column in bold).</p>
{_budget_section(views, spec)}
{_configurations_section(views, spec)}
<h2 id="trials">Trials</h2>
{_trials_section(views, spec, detailed)}
<h2 id="detail">Trial detail</h2>
<div class="controls"><select id="trial-select"><option value="">choose a trial</option>{''.join(options)}</select></div>
<p id="detail-missing" class="muted" hidden></p>
{''.join(details)}
"""
    plotly_js = get_plotlyjs()
    csp = ("default-src 'none'; script-src 'sha256-{}' 'sha256-{}'; style-src 'unsafe-inline'; "
           "img-src data:; font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'"
           ).format(_sha256(plotly_js), _sha256(_JS))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(spec.title)}</title><style>{_CSS}</style>"
        f"<script>{plotly_js}</script></head><body>{body}"
        + "".join(figures.blobs)
        + f"<script>{_JS}</script></body></html>\n"
    )
