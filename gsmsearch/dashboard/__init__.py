"""The Pareto dashboard: a live Dash app and a static HTML report over study databases.

- :mod:`._spec`: the dashboard spec (``dashboards/NAME.yaml``), validated like study specs;
- :mod:`._source`: reading studies read-only (the database refuses writes);
- :mod:`._data`: pure computations (fronts per family, hypervolume, budget table, coverage);
- :mod:`._figures`: plotly figures; :mod:`._report`: the static report; :mod:`._app`: the Dash app.

Dash is imported only by :func:`create_app`, so importing this package stays light.
"""
from ._data import budget_table, coverage_counts, family_hypervolumes, family_points, hypervolume_history
from ._report import render_report
from ._source import DataCache, StudySource, StudyView, load_view, readonly_storage, resolve_sources, sources_in_storage
from ._spec import DashboardSpec, dashboard_spec_from_dict, load_dashboard_spec

__all__ = [
    "DashboardSpec", "dashboard_spec_from_dict", "load_dashboard_spec", "StudySource", "StudyView",
    "DataCache", "load_view", "readonly_storage", "resolve_sources", "sources_in_storage",
    "budget_table", "coverage_counts", "family_hypervolumes", "family_points", "hypervolume_history",
    "render_report", "create_app",
]


def create_app(*args, **kwargs):
    """The Dash app (see :func:`gsmsearch.dashboard._app.create_app`)."""
    from ._app import create_app as _create_app

    return _create_app(*args, **kwargs)
