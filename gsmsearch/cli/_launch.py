"""`gsmsearch launch`: create or continue a study and run its trials on Ray."""
from __future__ import annotations

import argparse

HELP = "run a study spec: trials on Ray, results and Pareto front in the study database"
EXAMPLES = """examples:
  gsmsearch launch studies/quickstart.yaml
  gsmsearch launch studies/quickstart.yaml --dry-run          # validate, show example trials
  gsmsearch launch studies/quickstart.yaml --resume           # continue after Ctrl-C or a crash
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


def run(args) -> int:
    from ..search import launch
    from ._format import front_table

    summary = launch(args.spec, address=args.address, resume=args.resume, force=args.force,
                     dry_run=args.dry_run, status_interval=args.status_interval)
    if args.dry_run:
        return 0
    print(f"study {summary.study_name}: {summary.completed} complete, {summary.failed} failed "
          f"({summary.storage})")
    if summary.front:
        print(front_table(summary.front))
    return 130 if summary.interrupted else 0
