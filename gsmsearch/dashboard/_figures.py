"""Plotly figures for the dashboard and the report, built from :mod:`._data`.

Every string that comes from a study (names, families, parameters, failure messages) passes
through :func:`esc` before it reaches a figure: plotly renders a subset of HTML in labels and
hover text, and escaped text is shown literally.  Points carry ``customdata = [study key, trial
number]`` so a click can open the trial.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _data

__all__ = ["esc", "family_color", "pareto_figure", "comparison_figure", "hypervolume_figure",
           "layer_flops_figure", "coverage_figure", "hover_text", "empty_figure", "safe_figure",
           "no_points_message", "structure_layers", "structure_notes", "METRIC_LABELS", "configuration_table",
           "SEEDS_NOTE"]

_COLORS = {"gblr": "#d62728", "lowrank": "#1f77b4", "blockdiag": "#2ca02c", "monarch": "#9467bd",
           "blocksparse": "#8c564b", "blocklowrank": "#e377c2", "blast": "#17becf", "dense": "#111111"}
_OTHER_COLORS = ("#ff7f0e", "#bcbd22", "#7f7f7f", "#aec7e8", "#98df8a")
#: axis titles of the metrics other than ``quality``, whose title says the split its study measured it on
#: (:func:`gsmsearch.dashboard._data.metric_title`)
METRIC_LABELS = {
    "val_quality": "quality (val)", "test_quality": "quality (test)", "relative_flops": "relative FLOPs (vs dense)",
    "structured_relative_flops": "relative FLOPs of the structured layers",
    "relative_linear_flops": "relative FLOPs of the linear layers", "flops_per_sample": "FLOPs per sample",
    "params": "parameters", "latency_ms": "latency (ms)", "train_seconds": "training time (s)",
}
_HOVER = dict(align="left", font_size=11)


def esc(value: Any) -> str:
    """Text from a study, safe inside plotly labels (which render a subset of HTML)."""
    return html.escape(str(value), quote=False)


def family_color(family: str) -> str:
    if family in _COLORS:
        return _COLORS[family]
    return _OTHER_COLORS[sum(map(ord, family)) % len(_OTHER_COLORS)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)[:200]
    return str(value)


def hover_text(record, point, x: str, y: str, spread: Optional[_data.SeedSpread] = None, view=None) -> str:
    """A trial's hover text; with ``spread``, its configuration's: the means with their spread,
    n, each seed's values and the seeds that failed or are still running.  ``view`` (its study)
    names quality's split, and a trial's quality on the other split is shown beside it."""
    y_name, x_name = y, x
    y, x = _data.metric_title(y, view), _data.metric_title(x, view)
    if spread is None:
        lines = [f"<b>trial {record.number}</b> ({esc(point.family)}, {point.status})",
                 f"{esc(y)}: {point.y:.4g}", f"{esc(x)}: {point.x:.4g}"]
        if "quality" in (y_name, x_name):
            title, value = _data.other_split_quality(record, view)
            if value is not None:
                lines.insert(2, f"{esc(title)}: {value:.4g}")
    else:
        tried = spread.configuration.seeds_tried
        count = f"n={spread.n}" + (f" of {tried} seeds" if tried > spread.n else " seed" if spread.n == 1 else " seeds")
        lines = [f"<b>configuration of trial {record.number}</b> ({esc(point.family)}, {point.status}, {count})",
                 f"{esc(y)}: {_spread_text(spread.y)}", f"{esc(x)}: {_spread_text(spread.x)}"]
        lines += [f"  seed {esc(seed)} (trial {number}): {esc(y)} {yv:.4g}, {esc(x)} {xv:.4g}"
                  for number, seed, xv, yv in spread.seeds[:8]]
        if spread.n > 8:
            lines.append(f"  and {spread.n - 8} more seeds")
        for what, seeds in (("failed", spread.failed), ("running", spread.pending)):
            if seeds:
                lines.append(f"{what}: " + ", ".join(f"seed {esc(s)} (trial {n})" for n, s in seeds[:6])
                             + (" ..." if len(seeds) > 6 else ""))
    for key, value in _data.config_summary(record).items():
        if spread is None or key != "seed":
            lines.append(f"{esc(key)}: {esc(_fmt(value))}")
    return "<br>".join(lines[:30])


def _spread_text(spread) -> str:
    """Mean ± sample std (with the range) over seeds; the value alone for one seed."""
    if spread.std is None:
        return f"{spread.mean:.4g}"
    if not spread.varies:
        return f"{spread.mean:.4g} (every seed)"
    return f"{spread.mean:.4g} ± {spread.std:.2g} (std; range {spread.low:.4g} to {spread.high:.4g})"


def empty_figure(message: str, height: int = 260):
    import plotly.graph_objects as go

    import textwrap

    message = str(message)
    if len(message) > 600:
        message = message[:600] + "..."
    lines = textwrap.wrap(message, 90, break_long_words=True, break_on_hyphens=False) or [""]
    fig = go.Figure()
    fig.add_annotation(text="<br>".join(esc(line) for line in lines), showarrow=False, x=0.5, y=0.5,
                       xref="paper", yref="paper")
    fig.update_layout(template="plotly_white", height=height, xaxis_visible=False, yaxis_visible=False,
                      margin=dict(l=20, r=20, t=30, b=20))
    return fig


def no_points_message(view, spec, feasible: bool = False) -> str:
    """Why a study has no point to draw on the spec's axes, in words."""
    x, y = spec.axes.x, spec.axes.y
    complete = [r for r in view.records if r.state == "COMPLETE"]
    if not view.records:
        return f"{view.label}: no trials yet"
    if not complete:
        return f"{view.label}: no completed trials yet"
    families = _data.trial_families(complete, spec.families)
    if not _data.trial_families(complete):
        return (f"{view.label}: its completed trials record no structure family (a study not run by gsmsearch?); "
                f"see the trials table")
    if not families:
        return f"{view.label}: no completed trials of the families shown ({', '.join(spec.families or [])})"
    with_values = _data._complete_xy([r for r in complete if r.family in families], x, y, view.metric_names)
    if not with_values:
        names = ", ".join(view.metric_names[:6]) or "none"
        return (f"{view.label}: no completed trial has finite values of both {y} and {x} "
                f"(the study's objectives: {names})")
    if feasible and not any(r.feasible for r, _, _ in with_values):
        return f"{view.label}: no feasible completed trials yet"
    return f"{view.label}: nothing to draw"


def safe_figure(make, view, spec, **kwargs):
    """``make(view, spec)``, or a figure saying why it could not be drawn: one odd study never
    stops a page or a report."""
    try:
        return make(view, spec, **kwargs)
    except Exception as error:  # noqa: BLE001
        text = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return empty_figure(f"{view.label}: this view could not be drawn ({type(error).__name__}: {text})")


def short(text: Any, limit: int = 80) -> str:
    """Text from a study cut to ``limit`` characters (for titles, which do not wrap)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _axis_title(metric: str, over_seeds: str = "", view=None) -> str:
    """The metric's label (quality's with the split ``view``'s study measured it on); ``over_seeds``
    ("mean" or "mean ± std"): what a point and its error bar stand for where configurations ran
    with several seeds."""
    label = esc(_data.metric_title(metric, view) if metric == "quality" else METRIC_LABELS.get(metric, metric))
    return f"{label}: {over_seeds} over seeds" if over_seeds else label


def _seed_axes(spreads) -> Tuple[str, str]:
    """(x, y) axis suffixes for :func:`_axis_title` where configurations ran with several seeds:
    "mean ± std" on an axis with error bars (its value varies across some configuration's
    seeds), else "mean"."""
    if not spreads:
        return "", ""
    return tuple("mean ± std" if any(getattr(s, axis).varies for s in spreads.values()) else "mean"
                 for axis in ("x", "y"))


def _dense_line(fig, spec, **where) -> None:
    if spec.axes.x.startswith("relative") or spec.axes.x == "structured_relative_flops":
        fig.add_vline(x=1.0, line_dash="dot", line_color="#888", **where)


def _references(fig, spec, showlegend: bool = True, **where) -> None:
    if not spec.references:
        return
    import plotly.graph_objects as go

    fig.add_trace(go.Scatter(
        x=[r.x for r in spec.references], y=[r.y for r in spec.references], mode="markers+text",
        name="reference points", text=[esc(r.label) for r in spec.references], textposition="top left",
        marker=dict(symbol="diamond", size=11, color="#444"), hovertemplate="%{text}<extra></extra>",
        showlegend=showlegend, legendgroup="references"), **where)


_STYLE = {
    "front": dict(opacity=1.0, size=9, symbol="circle"),
    "dominated": dict(opacity=0.25, size=7, symbol="circle"),
    "infeasible": dict(opacity=0.25, size=8, symbol="x"),
}


def _error_traces(group, spreads, color: str, opacity: float, legendgroup: str) -> list:
    """Error bars of the points of one trace: ± the sample std over each configuration's seeds,
    on each axis for the configurations whose value varies across their seeds (FLOPs usually do
    not; a configuration with one seed has no spread).  They are traces of their own, drawn
    without markers and without hover, holding only the points that have a bar: plotly draws a
    zero-length bar for a missing value in an error array, and a configuration with one seed has
    no bar, not a zero one."""
    import plotly.graph_objects as go

    if not spreads:
        return []
    bar_color = color if opacity >= 1 else _faded(color, opacity)
    traces = []
    for axis in ("y", "x"):
        chosen = [p for p in group if getattr(spreads[p.number], axis).varies]
        if not chosen:
            continue
        bars = dict(type="data", symmetric=True, array=[getattr(spreads[p.number], axis).std for p in chosen],
                    visible=True, thickness=1.2, width=3, color=bar_color)
        traces.append(go.Scatter(
            x=[p.x for p in chosen], y=[p.y for p in chosen], mode="none", showlegend=False, hoverinfo="skip",
            legendgroup=legendgroup, name=f"{legendgroup} ± std ({axis})", **{f"error_{axis}": bars}))
    return traces


def _faded(color: str, opacity: float) -> str:
    red, green, blue = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{max(opacity, 0.35)})"


def _family_traces(view, family: str, points: List[_data.Point], spec, *, statuses=("front", "dominated", "infeasible"),
                   showlegend: bool = True, records=None, spreads=None):
    """Scatter traces of one family: its front (markers joined as the attainment staircase),
    then dominated and infeasible points, dimmed.  Empty groups add no trace.  ``records`` and
    ``spreads``: from :func:`_data.drawn_records` (a point per configuration, where
    configurations ran with several seeds, each group of points after its error bars)."""
    import plotly.graph_objects as go

    records = {r.number: r for r in (view.records if records is None else records)}
    spreads = spreads or {}
    color = family_color(family)

    def hover(group):
        return [hover_text(records[p.number], p, spec.axes.x, spec.axes.y, spreads.get(p.number), view)
                for p in group]

    if family == "dense":
        # the dense model is the reference every structure is measured against: always drawn in
        # full, whatever the study's constraints say about it
        group = sorted(points, key=lambda p: (p.x, p.y))
        return _error_traces(group, spreads, color, 1.0, "dense") + [go.Scatter(
            x=[p.x for p in group], y=[p.y for p in group], mode="markers", name="dense model",
            marker=dict(color=color, size=14, symbol="star"), legendgroup="dense", showlegend=showlegend,
            text=hover(group), customdata=[[view.key, p.number] for p in group],
            hovertemplate="%{text}<extra></extra>", hoverlabel=_HOVER)] if group else []
    traces = []
    for status in statuses:
        group = sorted((p for p in points if p.status == status), key=lambda p: (p.x, p.y))
        if not group:
            continue
        style = _STYLE[status]
        symbol = style["symbol"]
        traces += _error_traces(group, spreads, color, style["opacity"], esc(family))
        traces.append(go.Scatter(
            x=[p.x for p in group], y=[p.y for p in group],
            mode="lines+markers" if status == "front" else "markers",
            line=dict(color=color, width=2, shape="hv"),
            marker=dict(color=color, size=style["size"], symbol=symbol,
                        opacity=style["opacity"], line=dict(width=0)),
            name=f"{esc(family)} {status}" if status != "front" else esc(family),
            legendgroup=esc(family), showlegend=showlegend,
            text=hover(group), customdata=[[view.key, p.number] for p in group],
            hovertemplate="%{text}<extra></extra>", hoverlabel=_HOVER,
        ))
    return traces


def pareto_figure(view, spec, height: int = 460):
    """Every family's trials on quality vs cost: fronts bright, dominated and infeasible dimmed,
    the dense cost as a dotted line, the spec's reference points as diamonds."""
    import plotly.graph_objects as go

    if view.error:
        return empty_figure(view.error)
    records, spreads = _data.drawn_records(view.records, spec.axes.x, spec.axes.y, view.metric_names)
    points = _data.family_points(records, spec.axes.x, spec.axes.y, view.metric_names, spec.families)
    if not any(points.values()):
        return empty_figure(no_points_message(view, spec))
    points, sampled = _data.sample_points(points, spec.max_points)
    fig = go.Figure()
    for family, family_pts in points.items():
        for trace in _family_traces(view, family, family_pts, spec, records=records, spreads=spreads):
            fig.add_trace(trace)
    _references(fig, spec)
    _dense_line(fig, spec)
    over_x, over_y = _seed_axes(spreads)
    title = "Pareto fronts of the means over seeds" if spreads else "Pareto fronts"
    _sample_note(fig, sampled, spreads)
    fig.update_layout(
        template="plotly_white", height=height, title=dict(text=f"{title}: {esc(short(view.label))}", x=0.01),
        xaxis=dict(title=_axis_title(spec.axes.x, over_x, view), type="log" if spec.axes.log_x else "linear"),
        yaxis=dict(title=_axis_title(spec.axes.y, over_y, view)), legend=dict(groupclick="togglegroup"),
        margin=dict(l=60, r=20, t=50, b=50), uirevision=f"pareto-{view.key}", clickmode="event",
    )
    return fig


def sample_text(sampled, spreads=None) -> str:
    """What a figure's sample of dominated and infeasible points left out, in words."""
    what = "dominated and infeasible configurations" if spreads else "dominated and infeasible trials"
    return sampled.note(what)


def _sample_note(fig, sampled, spreads=None) -> None:
    """A line under the figure's title saying how its dominated and infeasible points were
    sampled (nothing when every point is drawn)."""
    if sampled is None:
        return
    fig.add_annotation(text=esc(sample_text(sampled, spreads)), showarrow=False, xref="paper", yref="paper",
                       x=0, y=1.0, xanchor="left", yanchor="bottom", font=dict(size=11, color="#666"),
                       name="sample-note")


def comparison_figure(view, spec, height: int = 360):
    """GBLR's front against each hand-crafted family's front, one panel per family (shared axes),
    with the dense trials and the dense cost in every panel."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if view.error:
        return empty_figure(view.error)
    records, spreads = _data.drawn_records(view.records, spec.axes.x, spec.axes.y, view.metric_names)
    points = _data.family_points(records, spec.axes.x, spec.axes.y, view.metric_names, spec.families)
    others = [f for f in points if f not in ("gblr", "dense") and points[f]]
    if not any(points.values()):
        return empty_figure(no_points_message(view, spec))
    if not points.get("gblr") or not others:
        return empty_figure(f"{view.label}: the comparison needs completed GBLR trials and at least one "
                            f"hand-crafted family")
    points, sampled = _data.sample_points(points, spec.max_points)
    fig = make_subplots(rows=1, cols=len(others), shared_yaxes=True, shared_xaxes=True,
                        subplot_titles=[f"gblr vs {esc(f)}" for f in others], horizontal_spacing=0.03)
    for column, family in enumerate(others, start=1):
        first = column == 1
        for name in ("gblr", family, "dense"):
            if not points.get(name):
                continue
            for trace in _family_traces(view, name, points[name], spec, statuses=("front", "dominated"),
                                        showlegend=first or name == family, records=records, spreads=spreads):
                fig.add_trace(trace, row=1, col=column)
        _references(fig, spec, showlegend=first, row=1, col=column)
        _dense_line(fig, spec, row=1, col=column)
    fig.update_xaxes(type="log" if spec.axes.log_x else "linear")
    over_x, over_y = _seed_axes(spreads)
    fig.update_xaxes(title_text=_axis_title(spec.axes.x, over_x, view), row=1, col=1)
    fig.update_yaxes(title_text=_axis_title(spec.axes.y, over_y, view), row=1, col=1)
    if sampled is not None:
        fig.add_annotation(text=esc(sample_text(sampled, spreads)), showarrow=False, xref="paper", yref="paper",
                           x=0, y=1.12, xanchor="left", yanchor="bottom", font=dict(size=11, color="#666"),
                           name="sample-note")
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=80, b=50),
                      title=dict(text=f"GBLR against each hand-crafted family: {esc(short(view.label))}", x=0.01),
                      uirevision=f"compare-{view.key}")
    return fig


def hypervolume_figure(view, spec, height: int = 340):
    """Left: each family's hypervolume (same reference point for all); right: how it grew."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if view.error:
        return empty_figure(view.error)
    reference = (spec.reference.x, spec.reference.y)
    records, spreads = _data.drawn_records(view.records, spec.axes.x, spec.axes.y, view.metric_names)
    volumes = _data.family_hypervolumes(records, spec.axes.x, spec.axes.y, view.metric_names, reference,
                                        spec.families)
    history = _data.hypervolume_history(view.records, spec.axes.x, spec.axes.y, view.metric_names, reference,
                                        spec.families)
    if not any(history.values()):
        return empty_figure(no_points_message(view, spec, feasible=True))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65], horizontal_spacing=0.1,
                        subplot_titles=["hypervolume per family", "hypervolume over trials"])
    families = list(volumes)
    fig.add_trace(go.Bar(x=[esc(f) for f in families], y=[volumes[f] for f in families],
                         marker_color=[family_color(f) for f in families], name="hypervolume",
                         showlegend=False, hovertemplate="%{x}: %{y:.4g}<extra></extra>"), row=1, col=1)
    for family in families + ["all"]:
        steps = _steps(history.get(family) or [])
        if not steps:
            continue
        fig.add_trace(go.Scatter(
            x=[n for n, _ in steps], y=[v for _, v in steps], mode="lines+markers",
            line=dict(shape="hv", color=family_color(family) if family != "all" else "#999",
                      dash="dash" if family == "all" else "solid"),
            marker=dict(size=5), name=esc(family) if family != "all" else "all families",
            hovertemplate="trial %{x}: %{y:.4g}<extra>" + esc(family) + "</extra>"), row=1, col=2)
    fig.update_xaxes(title_text="trial number", row=1, col=2)
    fig.update_yaxes(title_text=f"hypervolume (ref. x={reference[0]:g}, y={reference[1]:g})", row=1, col=1)
    title = "Hypervolume of the means over seeds" if spreads else "Hypervolume"
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=60, b=50),
                      title=dict(text=f"{title}: {esc(short(view.label))}", x=0.01), uirevision=f"hv-{view.key}")
    return fig


def _steps(history: List[Tuple[int, float]]) -> List[Tuple[int, float]]:
    """The entries of a hypervolume history where its value changes, and its last one: the same
    staircase line (drawn ``hv``) from a marker per change instead of per trial."""
    return [entry for index, entry in enumerate(history)
            if index == 0 or index == len(history) - 1 or entry[1] != history[index - 1][1]]


def layer_flops_figure(record, height: int = 300):
    """How the trial's FLOPs are spread over its structured layers (bars), against each layer's
    dense FLOPs (outlined)."""
    import plotly.graph_objects as go

    rows = _data.layer_budget(record.user_attrs.get("layers") or {})
    if not rows:
        return empty_figure("this trial recorded no structured layers", height=160)
    names = [esc(r["layer"]) for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=[r["dense_flops"] for r in rows], name="dense FLOPs",
                         marker=dict(color="rgba(0,0,0,0)", line=dict(color="#888", width=1.5)),
                         hovertemplate="%{x}: dense %{y:,.0f} FLOPs<extra></extra>"))
    fig.add_trace(go.Bar(
        x=names, y=[r["flops"] for r in rows], name="structured FLOPs",
        marker_color=[family_color(r["family"]) for r in rows],
        text=[f"{r['share']:.0%} of total" if math.isfinite(r["share"]) else "" for r in rows],
        textposition="outside",
        customdata=[[esc(r["family"]), r["relative"]] for r in rows],
        hovertemplate="%{x} (%{customdata[0]}): %{y:,.0f} FLOPs, %{customdata[1]:.1%} of dense, "
                      "%{text}<extra></extra>"))
    fig.update_layout(template="plotly_white", height=height, barmode="overlay", bargap=0.3,
                      title=dict(text="FLOPs per layer (budget spread)", x=0.01),
                      yaxis_title="FLOPs per sample", margin=dict(l=60, r=20, t=50, b=80))
    return fig


def coverage_figure(name: str, layer: Dict[str, Any], max_cells: int = 128, height: int = 320):
    """The learned GBLR structure of one layer: how many components cover each weight entry
    (rows = outputs, columns = inputs), block-averaged when the layer is larger than max_cells."""
    import plotly.graph_objects as go

    structure, why = _data.layer_structure(layer)
    if structure is None:
        return empty_figure(f"{name}: its structure is not drawn ({why})", height=160)
    out_features, in_features, intervals = structure
    counts, rows, cols = _data.coverage_counts(intervals, out_features, in_features, max_cells)
    exact = len(rows) - 1 == out_features and len(cols) - 1 == in_features
    fig = go.Figure(go.Heatmap(
        z=counts.round(3).tolist(), x=((cols[:-1] + cols[1:] - 1) / 2).tolist(),
        y=((rows[:-1] + rows[1:] - 1) / 2).tolist(), colorscale="Viridis", zmin=0,
        colorbar=dict(title=dict(text="components" if exact else "mean<br>components"), thickness=12),
        hovertemplate=("row %{y:.0f}, column %{x:.0f}: %{z} component(s)" if exact else
                       "rows ~%{y:.0f}, columns ~%{x:.0f}: %{z:.2f} components (block mean)") + "<extra></extra>",
    ))
    live = layer.get("live_components", len(intervals))
    live = live if _data._whole(live) is not None else len(intervals)
    flops, dense = _data._finite(layer.get("flops")), _data._finite(layer.get("dense_flops"))
    cost = f", {flops:,.0f} of {dense:,.0f} FLOPs ({flops / dense:.1%})" if flops is not None and dense else ""
    size = max(1.0, out_features / max(in_features, 1))
    fig.update_layout(
        template="plotly_white", height=int(min(520, max(height, 200 * min(size, 2.5)))),
        title=dict(text=f"{esc(short(name, 60))}: {out_features}x{in_features}, {live} live component(s){cost}", x=0.01,
                   font_size=13),
        xaxis=dict(title="input (column)", range=[-0.5, in_features - 0.5], constrain="domain"),
        yaxis=dict(title="output (row)", autorange="reversed", scaleanchor="x", constrain="domain"),
        margin=dict(l=60, r=20, t=50, b=50),
    )
    return fig


def structure_layers(record) -> List[tuple]:
    """(name, layer summary) of the trial's layers that have recorded intervals (GBLR) that can be
    drawn (see :func:`structure_notes` for those that cannot)."""
    layers = record.user_attrs.get("layers")
    if not isinstance(layers, dict):
        return []
    return [(str(name), layer) for name, layer in layers.items()
            if isinstance(layer, dict) and "intervals" in layer and _data.layer_structure(layer)[0] is not None]


def structure_notes(record, limit: int = 8) -> List[str]:
    """Why parts of the trial's recorded structure are not drawn (a malformed ``layers`` record)."""
    layers = record.user_attrs.get("layers")
    if layers is None or layers == {}:
        return []
    if not isinstance(layers, dict):
        return [f"its layers record is a {type(layers).__name__}, not a mapping of layer names to layers"]
    notes = []
    for name, layer in layers.items():
        if not isinstance(layer, dict):
            notes.append(f"{str(name)[:200]}: not a layer record ({type(layer).__name__})")
        elif "intervals" in layer:
            structure, why = _data.layer_structure(layer)
            if structure is None:
                notes.append(f"{str(name)[:200]}: its structure is not drawn ({why})")
    if len(notes) > limit:
        notes = notes[:limit] + [f"and {len(notes) - limit} more"]
    return notes


def interval_rows(layer: Dict[str, Any], limit: int = 64) -> List[Dict[str, Any]]:
    """The component intervals as table rows (rows/columns as half-open, cyclic ranges)."""
    structure, _ = _data.layer_structure(layer)
    if structure is None:
        return []
    out_features, in_features, intervals = structure
    rows = []
    for k, (row_start, row_len, col_start, col_len) in enumerate(intervals[:limit]):
        def span(start, length, size):
            end = (start + length) % size
            wrap = " (wraps)" if start + length > size else ""
            return f"{start}..{end if end or not length else size}{wrap}"

        rows.append({"component": k, "rows": span(row_start, row_len, out_features),
                     "row length": row_len, "columns": span(col_start, col_len, in_features),
                     "column length": col_len, "entries": row_len * col_len})
    return rows


def figure_json(fig) -> str:
    """A figure as JSON safe to embed in an HTML <script type=application/json> element."""
    import plotly.io as pio

    text = pio.to_json(fig, validate=False, pretty=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def budget_rows(view, spec) -> List[Dict[str, Any]]:
    """Rows of the "best quality at budget" table: one per family, a cell per budget."""
    records, spreads = _data.drawn_records(view.records, spec.axes.x, spec.axes.y, view.metric_names)
    table = _data.budget_table(records, spec.axes.x, spec.axes.y, view.metric_names, spec.budgets,
                               spec.families)
    rows = []
    for family, cells in table.items():
        row = {"family": family}
        for budget in spec.budgets:
            best = cells.get(budget)
            spread = None if best is None else spreads.get(best.number)
            row[f"<= {budget:g}"] = (None if best is None else (best.y, best.x, best.number) if spread is None
                                     else (best.y, best.x, best.number, spread.y.std, spread.n))
        rows.append(row)
    return rows


def budget_cell_text(cell: Optional[tuple]) -> str:
    """A trial's quality, or (where configurations ran with several seeds) a configuration's mean
    quality ± sample std over its n seeds."""
    if cell is None:
        return "-"
    if len(cell) == 3:
        y, x, number = cell
        return f"{y:.4f} (trial {number}, x={x:.3g})"
    y, x, number, std, n = cell
    spread = "" if std is None else f" ± {std:.2g}"
    return f"{y:.4f}{spread} (n={n}, configuration of trial {number}, x={x:.3g})"


def best_cells(rows: Sequence[Dict[str, Any]], budgets) -> Dict[str, Optional[str]]:
    """budget column -> family with the best quality in it (None if no family has a trial)."""
    out = {}
    for budget in budgets:
        column = f"<= {budget:g}"
        cells = [(row[column][0], row["family"]) for row in rows if row.get(column)]
        out[column] = max(cells)[1] if cells else None
    return out


#: what the per-configuration table (and the figures of a study run with several seeds) show
SEEDS_NOTE = ("Each configuration (a family and its knob values) is trained once per seed. Its point in the "
              "figures is the mean over its completed seeds, with error bars of ± one sample standard deviation "
              "(n − 1) on each axis where its values vary across seeds: none for a configuration with one "
              "completed seed, nor for a value that is the same for every seed (FLOPs, usually). Fronts, "
              "hypervolumes and the budget table are computed from the means, and a configuration is feasible "
              "when its mean constraints hold. n counts the completed seeds; failed and pending seeds are listed.")


def configuration_table(views, spec) -> tuple:
    """(rows, columns) of the per-configuration table over every study run with several seeds
    (no rows when none is); a study whose rows cannot be computed is left out (its figures say
    what is wrong)."""
    rows: List[Dict[str, Any]] = []
    for view in views:
        if view.error:
            continue
        try:
            rows += _data.configuration_rows(view, spec.axes.x, spec.axes.y, spec.families)
        except Exception:  # noqa: BLE001
            continue
    columns = [c for c in dict.fromkeys(c for row in rows for c in row) if c != "id"]
    return rows, columns
