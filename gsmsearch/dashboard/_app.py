"""The live dashboard: a Dash app over read-only study databases, refreshing while studies run.

Views (one column per study where it makes sense): Pareto fronts per family, GBLR against each
hand-crafted family, hypervolume (per family and over trials), best quality at each budget, a
table of configurations over seeds (where a study ran them with several seeds: the figures then
draw each configuration's means with error bars), a sortable and filterable trial table, and the
detail of a clicked trial (FLOPs per layer, coverage heatmaps and intervals of its learned layers).

Safety: Dash renders every string as text (no ``dangerously_allow_html``, no markdown cells);
figure text is escaped in :mod:`._figures`; responses carry a Content-Security-Policy that allows
only Dash's own scripts; the data comes through :class:`._source.DataCache`, whose connections
cannot write.
"""
from __future__ import annotations

import html as html_text
import math
import re
from typing import Any, Dict, List

from . import _data, _figures
from ._source import DataCache

__all__ = ["create_app"]

_CSS = {
    "page": {"fontFamily": 'system-ui,-apple-system,"Segoe UI",Roboto,sans-serif', "maxWidth": "1600px",
             "margin": "0 auto", "padding": "0 18px 40px", "color": "#222"},
    "row": {"display": "flex", "flexWrap": "wrap", "gap": "12px"},
    "cell": {"flex": "1 1 560px", "minWidth": "420px"},
    "muted": {"color": "#666", "fontSize": "0.9em"},
    "h2": {"fontSize": "1.2em", "margin": "24px 0 6px", "borderBottom": "1px solid #ddd", "paddingBottom": "3px"},
    "table": {"borderCollapse": "collapse", "fontSize": "0.85em"},
    "td": {"border": "1px solid #ddd", "padding": "3px 6px", "textAlign": "left", "verticalAlign": "top"},
}

# the look of every sortable table (configurations over seeds, trials)
_DATA_TABLE_STYLE = {
    "style_table": {"overflowX": "auto"},
    "style_cell": {"fontSize": "0.85em", "textAlign": "left", "maxWidth": "420px", "whiteSpace": "normal",
                   "fontFamily": "inherit"},
    "style_header": {"fontWeight": 600, "background": "#f4f4f4"},
}


def _td(text, header: bool = False, best: bool = False):
    from dash import html

    style = dict(_CSS["td"], **({"background": "#f4f4f4"} if header else {}),
                 **({"fontWeight": 600, "background": "#eef7ee"} if best else {}))
    return (html.Th if header else html.Td)(text, style=style)


def _simple_table(rows: List[Dict[str, Any]], columns: List[str], **kwargs):
    from dash import html

    return html.Table([
        html.Thead(html.Tr([_td(c, header=True) for c in columns])),
        html.Tbody([html.Tr([_td(_text(row.get(c))) for c in columns]) for row in rows]),
    ], style=_CSS["table"], **kwargs)


def _why(error: Exception) -> str:
    text = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else ""
    return "" if value is None else str(value)


def _budget_tables(views, spec):
    from dash import html

    cells = []
    for view in views:
        if view.error:
            continue
        try:
            rows = _figures.budget_rows(view, spec)
        except Exception as error:  # noqa: BLE001 - one odd study must not blank the page
            cells.append(html.P(f"{view.label}: the budget table could not be computed ({_why(error)})",
                                style=_CSS["muted"]))
            continue
        if not rows:
            continue
        columns = [f"<= {b:g}" for b in spec.budgets]
        best = _figures.best_cells(rows, spec.budgets)
        table = html.Table([
            html.Thead(html.Tr([_td("family", header=True)] + [_td(f"{spec.axes.x} {c}", header=True) for c in columns])),
            html.Tbody([html.Tr([_td(row["family"])] + [
                _td(_figures.budget_cell_text(row[c]), best=best[c] == row["family"]) for c in columns])
                for row in rows]),
        ], style=_CSS["table"], className="budget-table")
        heading = f"{view.label}: best {_data.metric_title(spec.axes.y, view)}"
        cells.append(html.Div([html.H3(heading, style={"fontSize": "1em"}), table], style=_CSS["cell"]))
    return cells or [html.P("No completed trials yet.", style=_CSS["muted"])]


def _trial_table_data(views, spec, notes=None):
    """(rows, columns) of the trials table: per study, every front trial and at most
    ``spec.max_points`` others (a uniform sample beyond that, said in ``notes`` when given)."""
    rows = []
    for view in views:
        if not view.error:
            try:
                mine, sampled = _data.sampled_trial_rows(view, spec.axes.x, spec.axes.y, spec.families,
                                                         spec.max_points)
            except Exception:  # noqa: BLE001 - its figures say what is wrong; the other studies' rows stay
                continue
            rows += mine
            if sampled is not None and notes is not None:
                notes.append(f"{view.label}: " + sampled.note(
                    "trials off the fronts", "every front member shown; gsmsearch export writes every trial"))
    columns = [c for c in dict.fromkeys(c for row in rows for c in row) if c not in ("id", "failure reason")]
    columns.append("failure reason")
    return _table_data(rows, columns)


def _configuration_table_data(views, spec):
    """(rows, columns, section style) of the per-configuration table: hidden when no study ran
    configurations with several seeds."""
    rows, columns = _figures.configuration_table(views, spec)
    return (*_table_data(rows, columns), {} if rows else {"display": "none"})


def _table_data(rows, columns):
    """DataTable rows and column definitions."""
    numeric = {c for c in columns if any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                                         for r in rows)}
    # the table's filter queries name columns as {id}: a column whose name has braces or quotes
    # (a parameter or metric may be named anything) gets a plain id, its name as the header
    ids = {c: c if not re.search(r'[{}"\'\\]', c) else f"column {index}" for index, c in enumerate(columns)}
    if any(ids[c] != c for c in columns):
        rows = [{ids.get(c, c): v for c, v in row.items()} for row in rows]
    return rows, [{"name": c, "id": ids[c], "type": "numeric" if c in numeric else "text"} for c in columns]


def _detail(view, record, spec):
    """The detail panel of one trial (all text rendered as text by Dash); a trial whose records
    cannot be shown gives a note saying why."""
    from dash import html

    try:
        return _detail_children(view, record, spec)
    except Exception as error:  # noqa: BLE001
        return [html.H3(f"{view.label}: trial {record.number}", id="detail-title"),
                html.P(f"This trial's detail could not be shown ({_why(error)}).", style=_CSS["muted"])]


def _detail_children(view, record, spec):
    from dash import dcc, html

    result = record.user_attrs.get("result") or {}
    facts = [{"key": "state", "value": record.state}, {"key": "family", "value": record.family or ""},
             {"key": "feasible", "value": "yes" if record.feasible else "no"}]
    facts += [{"key": _data.metric_title(m, view), "value": _text(_data.metric_value(record, m, view.metric_names))}
              for m in dict.fromkeys(list(view.metric_names) + [spec.axes.y, spec.axes.x])]
    title, other = _data.other_split_quality(record, view)
    facts.append({"key": title, "value": _text(other)})  # recorded beside the objective, never selected on
    facts += [{"key": k, "value": _text(result[k])} for k in
              ("params", "dense_params", "latency_ms", "dense_latency_ms", "train_seconds", "epochs_run") if k in result]
    facts += [{"key": k, "value": _figures._fmt(v)} for k, v in _data.config_summary(record).items()]
    if record.failure_reason:
        facts.append({"key": "failure reason", "value": record.failure_reason})
    children = [
        html.H3(f"{view.label}: trial {record.number} ({record.family or 'no family'})", id="detail-title"),
        html.Div([
            html.Div(_simple_table(facts, ["key", "value"]), style={"flex": "0 1 380px", "minWidth": "300px"}),
            html.Div(dcc.Graph(id="detail-flops", figure=_figures.layer_flops_figure(record),
                               config={"displaylogo": False}), style=_CSS["cell"]),
        ], style=_CSS["row"]),
    ]
    layers = _figures.structure_layers(record)
    notes = _figures.structure_notes(record)
    if layers:
        children.append(html.H3("Learned structure (components covering each weight entry)",
                                style={"fontSize": "1em"}))
        blocks = []
        for index, (name, layer) in enumerate(layers):
            columns = ["component", "rows", "row length", "columns", "column length", "entries"]
            blocks.append(html.Div([
                dcc.Graph(id=f"detail-heatmap-{index}", className="structure-heatmap",
                          figure=_figures.coverage_figure(name, layer), config={"displaylogo": False}),
                html.Details([html.Summary(f"{len(layer.get('intervals') or [])} component interval(s) of {name}"),
                              _simple_table(_figures.interval_rows(layer), columns)]),
            ], style={"flex": "1 1 420px"}))
        children.append(html.Div(blocks, style=_CSS["row"]))
    elif record.user_attrs.get("layers") and not notes:
        children.append(html.P("Hand-crafted structure: the coverage heatmap is drawn for learned (GBLR) layers.",
                               style=_CSS["muted"]))
    if notes:
        children.append(html.Div([html.P("Not drawn from this trial's recorded layers:", style=_CSS["muted"]),
                                  html.Ul([html.Li(note) for note in notes], style=_CSS["muted"])],
                                 className="structure-notes"))
    return children


def _content_security_policy(app) -> str:
    hashes = " ".join(app.csp_hashes())  # already quoted: 'sha256-...'
    return ("default-src 'self'; script-src 'self' " + hashes + "; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(spec, cache: DataCache):
    """The Dash app for ``spec`` over the studies of ``cache`` (call ``app.run`` to serve)."""
    import hashlib
    import json

    import dash
    from dash import ALL, Input, Output, State, ctx, dash_table, dcc, html, no_update
    from dash.exceptions import PreventUpdate
    from plotly.utils import PlotlyJSONEncoder

    app = dash.Dash(__name__, title=html_text.escape(spec.title), update_title=None, serve_locally=True,
                    suppress_callback_exceptions=False)
    app.index_string = app.index_string.replace("<html>", '<html lang="en">')

    def cells(kind: str, keys: List[str]):
        return [html.Div(dcc.Graph(id={"type": kind, "study": key}, config={"displaylogo": False}),
                         id=f"{kind}-{key}", style=_CSS["cell"]) for key in keys]

    def graphs(kind: str, keys: List[str]):
        return html.Div(cells(kind, keys), id=f"{kind}-row", style=_CSS["row"])

    ref = spec.reference

    def layout():
        """Built at every page load: a dashboard of a whole storage shows the studies it holds now."""
        keys = [view.key for view in cache.views()]
        return page(keys)

    def page(keys: List[str]):
        return html.Div([
            html.H1(spec.title, style={"fontSize": "1.5em", "margin": "18px 0 4px"}),
            html.P(f"Quality: {spec.axes.y}; cost: {spec.axes.x}; hypervolume reference point x={ref.x:g}, "
                   f"y={ref.y:g} for every family. Refreshes every {spec.refresh_seconds:g} s.", style=_CSS["muted"]),
            html.Ul(id="studies"),
            dcc.Interval(id="refresh", interval=int(spec.refresh_seconds * 1000)),
            dcc.Store(id="shown"),  # digest of what the last refresh sent to this page
            dcc.Store(id="page-keys", data=keys),  # the studies this page has figures for
            dcc.Store(id="selected"),
            html.Section([
                html.H2("Pareto fronts per family", style=_CSS["h2"]),
                html.P("Bright: each family's front (feasible, non-dominated); dimmed: dominated; crosses: infeasible; "
                       "stars: the dense model. Dotted line: the dense model's cost. Hover for a trial's configuration, "
                       "click for its structure.", style=_CSS["muted"]),
                graphs("pareto", keys),
            ], id="section-pareto"),
            html.Section([html.H2("GBLR against each hand-crafted family", style=_CSS["h2"]), graphs("compare", keys)],
                         id="section-compare"),
            html.Section([html.H2("Hypervolume", style=_CSS["h2"]), graphs("hypervolume", keys)], id="section-hypervolume"),
            html.Section([
                html.H2("Best quality at a budget", style=_CSS["h2"]),
                html.P(f"Per family, the best feasible trial (configuration, by its mean, where seeds repeat) with "
                       f"{spec.axes.x} at most the budget (best per column highlighted).", style=_CSS["muted"]),
                html.Div(id="budgets", style=_CSS["row"]),
            ], id="section-budgets"),
            html.Section([
                html.H2("Configurations over seeds", style=_CSS["h2"]),
                html.P(_figures.SEEDS_NOTE, style=_CSS["muted"]),
                dash_table.DataTable(
                    id="configurations", sort_action="native", filter_action="native", page_size=20,
                    **_DATA_TABLE_STYLE,
                    style_data_conditional=[{"if": {"filter_query": '{front} = "yes"'}, "fontWeight": 600}],
                ),
            ], id="section-configurations", style={"display": "none"}),
            html.Section([
                html.H2("Trials", style=_CSS["h2"]),
                html.P("Sort with the arrows, filter in the row under the headers (e.g. FAIL, gblr, > 0.9); click a "
                       "row for the trial's structure.", style=_CSS["muted"]),
                html.Div(id="trials-note", style=_CSS["muted"]),
                dash_table.DataTable(
                    id="trials", sort_action="native", filter_action="native", page_size=20,
                    **_DATA_TABLE_STYLE,
                    style_data_conditional=[{"if": {"filter_query": '{state} = "FAIL"', "column_id": "state"},
                                             "color": "#b00"},
                                            {"if": {"filter_query": '{front} = "yes"'}, "fontWeight": 600}],
                ),
            ], id="section-trials"),
            html.Section([
                html.H2("Trial detail", id="detail-heading", style=_CSS["h2"]),
                html.Div([html.P("Click a point in a front or a row of the table.", style=_CSS["muted"])],
                         id="detail"),
            ], id="section-detail"),
        ], style=_CSS["page"])

    app.layout = layout

    memo: Dict[Any, Any] = {}  # (what, study key) -> (the view it was computed from, the result)

    def computed(what, view, make):
        """``make(view, spec)``, reused while the study is unchanged (the cache then hands out the
        same view object): a storage of many studies refreshed every second stays responsive."""
        kept = memo.get((what, view.key))
        if kept is not None and kept[0] is view:
            return kept[1]
        result = make(view, spec)
        memo[(what, view.key)] = (view, result)
        return result

    def by_key(views_now, kind, make):
        index = {view.key: view for view in views_now}
        return [computed(make.__name__, index[item["id"]["study"]],
                         lambda view, spec: _figures.safe_figure(make, view, spec))
                if item["id"]["study"] in index
                else _figures.empty_figure("study not loaded") for item in ctx.outputs_list[kind]]

    @app.callback(
        Output({"type": "pareto", "study": ALL}, "figure"),
        Output({"type": "compare", "study": ALL}, "figure"),
        Output({"type": "hypervolume", "study": ALL}, "figure"),
        Output("budgets", "children"),
        Output("trials", "data"),
        Output("trials", "columns"),
        Output("configurations", "data"),
        Output("configurations", "columns"),
        Output("section-configurations", "style"),
        Output("studies", "children"),
        Output("trials-note", "children"),
        Output("shown", "data"),
        Input("refresh", "n_intervals"),
        State("shown", "data"),
    )
    def refresh(_, shown):
        views_now = cache.views()
        notes: List[str] = []
        rows, columns = _trial_table_data(views_now, spec, notes)
        configurations = _configuration_table_data(views_now, spec)
        studies = []
        if cache.discover and (cache.listing_error or not views_now):
            reason = f" ({cache.listing_error})" if cache.listing_error else ""
            studies.append(html.Li(f"No studies in this storage yet{reason}; a launched study appears here "
                                   f"with its figures.", style=_CSS["muted"]))
        for view in views_now:
            if view.error:
                studies.append(html.Li(f"{view.label}: {view.error}", style={"color": "#b00"}))
                continue
            states: Dict[str, int] = {}
            for r in view.records:
                states[r.state] = states.get(r.state, 0) + 1
            counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "no trials yet"
            studies.append(html.Li([html.B(view.label), f" (study {view.name}, {view.storage}): {counts}; "
                                                        f"{_data.split_note(view)}"]))
        outputs = (by_key(views_now, 0, _figures.pareto_figure), by_key(views_now, 1, _figures.comparison_figure),
                   by_key(views_now, 2, _figures.hypervolume_figure), _budget_tables(views_now, spec), rows,
                   columns, *configurations, studies, [html.P(note, className="sample-note") for note in notes])
        # send only what changed: a figure redrawn with the same data drops its hover label (and
        # a click in progress on it), the table its active cell
        # (the figures present are part of it: figures added for a new study are filled at once)
        present = [[item["id"] for item in ctx.outputs_list[kind]] for kind in range(3)]
        digest = hashlib.sha256(json.dumps([outputs, present], cls=PlotlyJSONEncoder,
                                           sort_keys=True).encode()).hexdigest()
        if digest == shown:
            raise PreventUpdate
        return (*outputs, digest)

    @app.callback(
        Output("pareto-row", "children"),
        Output("compare-row", "children"),
        Output("hypervolume-row", "children"),
        Output("page-keys", "data"),
        Input("refresh", "n_intervals"),
        State("page-keys", "data"),
        prevent_initial_call=True,
    )
    def new_studies(_, page_keys):
        """A study that appeared in the storage since the page loaded gets its figures (the next
        refresh fills them); the page is not reloaded, so nothing else the user did is lost."""
        keys = [view.key for view in cache.views()]
        if keys == list(page_keys or []):
            raise PreventUpdate
        return cells("pareto", keys), cells("compare", keys), cells("hypervolume", keys), keys

    @app.callback(
        Output("selected", "data"),
        Input({"type": "pareto", "study": ALL}, "clickData"),
        Input({"type": "compare", "study": ALL}, "clickData"),
        Input("trials", "active_cell"),
        prevent_initial_call=True,
    )
    def select(_pareto, _compare, active_cell):
        trigger = ctx.triggered_id
        if trigger == "trials":
            if not active_cell or not active_cell.get("row_id"):
                return no_update
            key, number = str(active_cell["row_id"]).split(":", 1)
            return {"study": key, "number": int(number)}
        value = ctx.triggered[0]["value"] if ctx.triggered else None
        points = (value or {}).get("points") or []
        custom = points[0].get("customdata") if points else None
        if not custom or len(custom) != 2:
            return no_update
        return {"study": str(custom[0]), "number": int(custom[1])}

    @app.callback(Output("detail", "children"), Input("selected", "data"), State("detail", "children"),
                  prevent_initial_call=True)
    def detail(selected, _current):
        if not selected:
            return no_update
        view = next((v for v in cache.views() if v.key == str(selected.get("study"))), None)
        record = None if view is None else next((r for r in view.records if r.number == selected.get("number")), None)
        if record is None:
            return [html.P("That trial is not in the loaded studies.", style=_CSS["muted"])]
        return _detail(view, view.detailed([record])[0], spec)

    # the studies' figures, computed once before the first page asks for them (on a study of
    # 100,000 trials, seconds): the first refresh finds them in the memo
    for view in cache.views():
        if not view.error:
            for make in (_figures.pareto_figure, _figures.comparison_figure, _figures.hypervolume_figure):
                computed(make.__name__, view, lambda view, spec, make=make: _figures.safe_figure(make, view, spec))

    policy = _content_security_policy(app)

    @app.server.after_request
    def _headers(response):
        response.headers.setdefault("Content-Security-Policy", policy)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    return app
