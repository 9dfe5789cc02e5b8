"""`gsmsearch train`: run one trial and print its result."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ._errors import UsageError

HELP = "train one model with one structure configuration and print the result"
EXAMPLES = """examples:
  gsmsearch train --workload digits-mlp --family gblr --budget 0.25 --epochs 20
  gsmsearch train --workload digits-mlp --family lowrank --budget 0.25 --mode finetune --json
  gsmsearch train --workload minilm-compress --family gblr --budget 0.5 --mode finetune --epochs 2
"""


#: Longest --*-options JSON accepted (characters); options are a few names and numbers.
MAX_OPTIONS_JSON = 65_536


def _json_dict(text: str) -> dict:
    from ..search._spec import excerpt

    if len(text) > MAX_OPTIONS_JSON:
        raise argparse.ArgumentTypeError(f"expected a JSON object of at most {MAX_OPTIONS_JSON} characters, "
                                         f"got {len(text)}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {excerpt(text)} ({error.msg})")
    except RecursionError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got one nested too deeply: {excerpt(text)}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {excerpt(text)}")
    return value


def _optional_float(text: str):
    return None if text.lower() in ("none", "null", "exact") else float(text)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help=HELP, description=HELP, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="digits-mlp", help="registered workload name")
    p.add_argument("--workload-options", type=_json_dict, default={}, metavar="JSON")
    p.add_argument("--family", default="gblr", help="structured family, or 'dense'")
    p.add_argument("--family-options", type=_json_dict, default={}, metavar="JSON")
    p.add_argument("--budget", type=float, default=0.25, help="target relative FLOPs of the structured layers")
    p.add_argument("--mode", choices=["scratch", "finetune"], default="scratch")
    p.add_argument("--budget-allocation", choices=["uniform", "global", "activation"], default="uniform",
                   help="finetune: every layer at --budget, or per-layer budgets from the dense "
                        "weights' spectra (global) or from the spectra of the weights times the "
                        "square root of their inputs' second moments (activation); same "
                        "per-sample total")
    p.add_argument("--include", nargs="*", default=None, help="layer-name patterns to structure")
    p.add_argument("--exclude", nargs="*", default=[], help="layer-name patterns to keep dense")
    p.add_argument("--lam", type=float, default=0.0, help="L1 strength on GBLR widths")
    p.add_argument("--budget-control", default="project-flops",
                   choices=["project-flops", "project-mean-width", "stop-shrinking", "none"])
    p.add_argument("--target-mean-width", type=float, default=None)
    p.add_argument("--sigma-init", type=_optional_float, default=1.0, help="'exact' for boxcar masks")
    p.add_argument("--sigma-final", type=_optional_float, default=100.0)
    p.add_argument("--sigma-start-epoch", type=float, default=None, help="default: epochs / 4")
    p.add_argument("--sigma-end-epoch", type=float, default=None, help="default: epochs")
    p.add_argument("--budget-anneal-epochs", type=float, default=None,
                   help="budget 1 -> --budget over these epochs (default: epochs/2 in scratch mode, 0 in finetune)")
    p.add_argument("--fit-method", choices=["greedy", "reference"], default="greedy",
                   help="finetune: GBLR from_dense initialisation")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--structure-lr", type=float, default=None,
                   help="widths/locations learning rate (default: 5e-4 in scratch mode, 0 in finetune mode)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None,
                   help="lr multiplier per step (default: the workload's)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear lr warm-up first")
    p.add_argument("--distill", type=float, default=0.0,
                   help="finetune: weight of distillation from the dense model in the loss, in [0, 1]")
    p.add_argument("--distill-temperature", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="forward passes under autocast at bf16/fp16, float32 master weights (default auto: "
                        "bf16 on a CUDA device that supports it, fp32 elsewhere; fp16 needs CUDA)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint each epoch here; resume if present")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--latency-batch", type=int, default=256, help="batch size of the latency measurement")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(run=run)


def _check_family_options(config) -> None:
    """Every --family-options name is one the family takes in this mode (else a TypeError deep
    in the layer constructors)."""
    from ..trainer._trial import family_option_names

    known = family_option_names(config.family, config.mode, [config.fit_method])
    unknown = sorted(set(config.family_options) - set(known))
    if unknown:
        raise UsageError(f"--family-options: unknown option {unknown[0]!r} of {config.family} in {config.mode} "
                         f"mode; known: {', '.join(known) or 'none'}")


def _check_device(device: str) -> None:
    """A device torch can name and this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device}: not a device; expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device here (use --device cpu)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                             f"(cuda:0..cuda:{count - 1})")
        return
    if parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"--device {device}: no MPS device here (use --device cpu)")
        return
    raise UsageError(f"--device {device}: unsupported device type {parsed.type!r}; expected cpu, cuda, cuda:N or mps")


def _check_checkpoint_dir(directory: str) -> None:
    """--checkpoint-dir is a folder, or can be made one (nothing is created here)."""
    from ..trainer._trial import folder_problem

    from ..search._spec import system_folder_problem

    problem = system_folder_problem(Path(directory)) or folder_problem(directory)
    if problem:
        raise UsageError(f"--checkpoint-dir {directory}: {problem}")


def run(args) -> int:
    from ..trainer import TrialConfig, run_trial

    # every trial-config field has its flag (dashes for underscores; tests/trainer checks this)
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    config = TrialConfig(**{name: value for name, value in vars(args).items() if name in fields},
                         measure_latency=not args.no_latency)
    # bad input refused before any work (not as a TypeError/RuntimeError once training starts)
    _check_family_options(config)
    _check_device(config.device)
    if args.checkpoint_dir is not None:
        _check_checkpoint_dir(args.checkpoint_dir)

    def progress(report):
        if not args.json:
            val = ", ".join(f"{k} {v:.4f}" for k, v in report.val.items())
            print(f"epoch {report.epoch}/{config.epochs}: train loss {report.train_loss:.4f}, {val}, "
                  f"relative FLOPs {report.relative_flops:.3f}, {report.seconds:.1f}s", file=sys.stderr)

    result = run_trial(config, on_epoch=progress, checkpoint_dir=args.checkpoint_dir)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2, default=str)
        print()
    else:
        print(result.summary())
    return 0
