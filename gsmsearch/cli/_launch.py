"""`gsmsearch launch`: create or continue a study and run its trials on Ray."""
from __future__ import annotations

import argparse
import sys

HELP = "run a study spec: trials on Ray, results and Pareto front in the study database"
EXAMPLES = """examples:
  gsmsearch launch studies/quickstart.yaml
  gsmsearch launch studies/quickstart.yaml --dry-run          # validate, show example trials
  gsmsearch launch studies/quickstart.yaml --resume           # continue after Ctrl-C or a crash
  gsmsearch launch examples/own_model/study.yaml              # your own model (docs/workloads.md)
  RAY_ADDRESS=auto gsmsearch launch studies/vit_b16_imagenet.yaml   # on a Ray cluster
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("launch", help=HELP, description=HELP, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: the spec's executor.address, else RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue an existing study")
    p.add_argument("--force", action="store_true",
                   help="continue even if the spec changed or another driver seems to be running")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and show example trials; write nothing")
    p.add_argument("--status-interval", type=float, default=30.0, metavar="SECONDS",
                   help="how often to print a progress line (default 30)")
    p.set_defaults(run=run)


def _check_storage_variables(spec_path: str) -> None:
    """Before the study starts (and Ray with it): every ${VAR} of the spec's storage URL is set,
    else an error naming the spec file.  Only the raw YAML is read here; launch validates it."""
    from ..search import SpecError, load_spec
    from ..search._spec import read_yaml
    from ..search._storage import unset_variables
    from ._studies import check_storage_variables

    try:
        data = read_yaml(spec_path)
    except SpecError:
        return  # launch reports it, with every other problem of the spec
    storage = data.get("storage") if isinstance(data, dict) else None
    if isinstance(storage, str) and unset_variables(storage):
        load_spec(spec_path)  # the spec's own errors come first
        check_storage_variables(spec_path, storage)


def run(args) -> int:
    from ..search import launch
    from ._format import front_table

    if not args.dry_run:
        _check_storage_variables(args.spec)

    summary = launch(args.spec, address=args.address, resume=args.resume, force=args.force,
                     dry_run=args.dry_run, status_interval=args.status_interval)
    if args.dry_run:
        return 0
    pruned = f", {summary.pruned} pruned" if summary.pruned else ""
    to_resume = f", {summary.to_resume} to resume (their worker or node died)" if summary.to_resume else ""
    print(f"study {summary.study_name}: {summary.completed} complete, {summary.failed} failed{pruned}{to_resume} "
          f"({summary.storage})")
    if summary.front:
        # the driver selects on validation quality; the test quality is only shown beside it
        names = {"quality": "quality (val)", "test_quality": "quality (test)"}
        print(front_table([{names.get(k, k): v for k, v in row.items()} for row in summary.front]))
    if summary.interrupted:
        return 130
    if summary.to_resume:
        # EX_TEMPFAIL, as for a database that stayed away: the same command with --resume continues
        print(f"gsmsearch: {summary.to_resume} trial(s) failed because their worker or node died; continue "
              f"the study with: gsmsearch launch {args.spec} --resume", file=sys.stderr)
        return 75
    return 0
