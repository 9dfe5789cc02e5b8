"""`gsmsearch dashboard` (live web app) and `gsmsearch report` (one static HTML file).

Both read studies read-only (the database connections refuse writes) and show the same views:
Pareto fronts per family, GBLR against each hand-crafted family, hypervolume, best quality at
budgets, the trial table and each trial's learned structure.
"""
from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from pathlib import Path

from ._errors import UsageError
from ._output import check_output_path, write_output
from ._studies import is_file

_TARGET_HELP = ("a dashboard spec (dashboards/NAME.yaml), a study spec (studies/NAME.yaml), or a study "
                "name with --storage")
_STORAGE_HELP = ("storage URL (e.g. sqlite:///studies/quickstart.db); alone: every study in it; with a spec: "
                 "replaces the studies' storage")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "dashboard", help="live Pareto dashboard of running or finished studies (web app on 127.0.0.1)",
        description="Serve the Pareto dashboard: fronts per family, GBLR against the hand-crafted families, "
                    "hypervolume, best quality at budgets, trials and their learned structures. The study "
                    "database is read-only for the dashboard; the page refreshes while studies run.",
        epilog="examples:\n  gsmsearch dashboard dashboards/quickstart.yaml\n"
               "  gsmsearch dashboard studies/quickstart.yaml --port 8051\n"
               "  gsmsearch dashboard --storage sqlite:///studies/quickstart.db\n"
               "  gsmsearch dashboard dashboards/quickstart.yaml --host 0.0.0.0 --allow-remote",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default=None, metavar="SPEC|STUDY", help=_TARGET_HELP)
    p.add_argument("--storage", default=None, help=_STORAGE_HELP)
    p.add_argument("--study", action="append", default=None, metavar="NAME",
                   help="with --storage alone: show only this study (repeatable; without it, every study in "
                        "the storage, including those launched after the dashboard started)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; anything but loopback needs --allow-remote)")
    p.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: anyone who reaches it can read the studies")
    p.add_argument("--refresh", type=float, default=None, metavar="SECONDS",
                   help="re-read the studies this often (default: the spec's refresh_seconds, 10)")
    p.add_argument("--max-points", type=int, default=None, metavar="N", help=_MAX_POINTS_HELP)
    p.set_defaults(run=run_dashboard)

    p = subparsers.add_parser(
        "report", help="write the dashboard's views as one self-contained HTML file (works offline)",
        description="Write a static HTML report (plotly.js inlined, no network needed, opens from disk) with "
                    "the dashboard's views, for CI artifacts and batch jobs.",
        epilog="examples:\n  gsmsearch report studies/quickstart.yaml -o quickstart-report.html\n"
               "  gsmsearch report quickstart --storage sqlite:///studies/quickstart.db\n"
               "  gsmsearch report --storage sqlite:///studies/quickstart.db   (every study in it)\n"
               "  gsmsearch report dashboards/quickstart.yaml -o report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default=None, metavar="SPEC|STUDY", help=_TARGET_HELP)
    p.add_argument("--storage", default=None, help=_STORAGE_HELP)
    p.add_argument("--study", action="append", default=None, metavar="NAME",
                   help="with --storage alone: report only this study (repeatable)")
    p.add_argument("-o", "--output", default=None, help="output file (default: NAME-report.html)")
    p.add_argument("--max-details", type=int, default=80,
                   help="trial details kept in the report: every completed trial up to this many, else the "
                        "families' front trials (default 80)")
    p.add_argument("--max-points", type=int, default=None, metavar="N", help=_MAX_POINTS_HELP)
    p.set_defaults(run=run_report)


_MAX_POINTS_HELP = ("per study, the dominated and infeasible trials drawn and the trial-table rows beside the front "
                    "trials: a study with more shows a uniform sample of N of them (seed 0), every front trial "
                    "shown, and says so (default: the spec's max_points, 2000)")


def _with_max_points(spec, value):
    """``spec`` with ``--max-points`` applied (checked as the spec field is)."""
    if value is None:
        return spec
    if not 0 <= value <= 1_000_000:
        raise UsageError(f"--max-points must be between 0 and 1000000, got {value}")
    return spec.model_copy(update={"max_points": value})


def _title(text: str) -> str:
    """A page title from a study name or URL, within the dashboard spec's 300 characters."""
    return text if len(text) <= 300 else text[:297] + "..."


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_target(target, storage, studies=None, *, discover=False):
    """(dashboard spec, study sources, default output stem) for the command line's arguments.
    ``discover``: with --storage alone (no --study), return no sources: the caller lists the
    storage's studies as it runs (the live dashboard), so an empty storage is not an error."""
    from ..dashboard import dashboard_spec_from_dict, load_dashboard_spec, resolve_sources, sources_in_storage
    from ..dashboard._source import StudySource, readonly_url_and_engine_kwargs

    if target is None:
        if not storage:
            raise UsageError("give a dashboard or study spec, or --storage URL")
        if discover and not studies:
            from ..search import redact

            spec = dashboard_spec_from_dict({"title": _title(f"Studies in {redact(storage)}"), "storage": storage,
                                             "studies": []}, "--storage", from_command_line=True)
            readonly_url_and_engine_kwargs(storage)  # a missing SQLite file fails here, not later
            return spec, [], "studies"
        sources = sources_in_storage(storage, studies)
        from ..search import redact

        spec = dashboard_spec_from_dict({"title": _title(f"Studies in {redact(storage)}"), "storage": storage,
                                         "studies": [{"study": s.name} for s in sources]},
                                        "--storage", from_command_line=True)
        return spec, sources, "studies"
    if studies:
        raise UsageError("--study goes with --storage alone (a spec names its studies)")
    path = Path(target)
    if target.endswith((".yaml", ".yml")) or is_file(target):
        spec = load_dashboard_spec(path)
        sources = resolve_sources(spec, path.resolve().parent)
        if storage:
            sources = [StudySource(s.name, storage, s.label) for s in sources]
        return spec, sources, path.stem
    if not storage:
        raise UsageError(f"{target!r} is not a spec file; give --storage URL with a study name")
    sources = sources_in_storage(storage, [target])
    spec = dashboard_spec_from_dict({"title": _title(f"Study {target}"), "storage": storage, "studies": [{"study": target}]},
                                    "command line", from_command_line=True)
    return spec, sources, target


def _spec_files(target, spec) -> list:
    """The spec files behind the command line's target: the target itself (a dashboard or study
    spec) and the study specs a dashboard spec names (relative to it)."""
    if target is None or not is_file(target):
        return []
    base = Path(target).resolve().parent
    files = [Path(target)]
    for ref in spec.studies:
        if ref.spec is not None:
            files.append(Path(ref.spec) if Path(ref.spec).is_absolute() else base / ref.spec)
    return files


def run_dashboard(args) -> int:
    import logging

    if not _is_loopback(args.host) and not args.allow_remote:
        raise UsageError(f"--host {args.host} would serve the studies beyond this machine; pass --allow-remote "
                         f"as well if that is intended (default: 127.0.0.1)")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.refresh is not None and not 1 <= args.refresh <= 3600:
        raise UsageError(f"--refresh must be between 1 and 3600 seconds, got {args.refresh:g}")
    discover = args.target is None and not args.study
    spec, sources, _ = load_target(args.target, args.storage, args.study, discover=discover)
    if args.refresh is not None:
        spec = spec.model_copy(update={"refresh_seconds": args.refresh})
    spec = _with_max_points(spec, args.max_points)
    from ..dashboard import DataCache, create_app

    cache = DataCache(sources, max_age=min(2.0, spec.refresh_seconds / 2),
                      discover=args.storage if discover else None)
    for view in cache.views():
        if view.error:
            print(f"gsmsearch: warning: {view.error}", file=sys.stderr)
    if discover and cache.listing_error:
        print(f"gsmsearch: warning: no studies listed yet ({cache.listing_error}); trying again at each refresh",
              file=sys.stderr)
    if not discover and all(view.error for view in cache.views()):
        raise UsageError("none of the studies could be read; not serving an empty dashboard")
    app = create_app(spec, cache)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    if not _is_loopback(args.host):
        print(f"gsmsearch: warning: serving on {args.host}: anyone who can reach it can read these studies",
              file=sys.stderr)
    count = len(cache.sources)
    print(f"gsmsearch dashboard: http://{shown}:{args.port}/ ({count} stud{'y' if count == 1 else 'ies'}"
          f"{', and any launched later' if discover else ''}, read-only; Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        app.run(host=args.host, port=args.port, debug=False)
    except OSError as error:
        raise UsageError(f"cannot listen on {shown}:{args.port}: {error.strerror or error}") from None
    except SystemExit as error:  # werkzeug exits when the port is taken
        if error.code:
            raise UsageError(f"cannot listen on {shown}:{args.port} (is the port in use? try --port)") from None
    return 0


def run_report(args) -> int:
    from ..dashboard import DataCache, render_report

    if args.max_details < 0:
        raise UsageError(f"--max-details must be >= 0, got {args.max_details}")
    if args.max_points is not None and not 0 <= args.max_points <= 1_000_000:
        raise UsageError(f"--max-points must be between 0 and 1000000, got {args.max_points}")
    spec, sources, stem = load_target(args.target, args.storage, args.study)
    spec = _with_max_points(spec, args.max_points)
    safe_stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100] or "study"
    output = check_output_path(args.output or f"{safe_stem}-report.html", databases=[s.url for s in sources],
                               specs=_spec_files(args.target, spec))
    views = DataCache(sources).views()
    for view in views:
        if view.error:
            print(f"gsmsearch: warning: {view.error}", file=sys.stderr)
    if all(view.error for view in views):
        raise UsageError("none of the studies could be read; no report written")
    text = render_report(views, spec, max_details=args.max_details)
    size = write_output(output, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    trials = sum(len(v.records) for v in views)
    print(f"wrote {output} ({size / 1e6:.1f} MB, {len(views)} stud{'y' if len(views) == 1 else 'ies'}, "
          f"{trials} trials); open it in a browser, no network needed")
    return 0
