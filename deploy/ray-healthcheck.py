"""Container healthcheck of a Ray node: exit 0 when the cluster's GCS at ADDRESS answers
(``ray status``) and a raylet process runs in this container (this node is up).
Usage: python deploy/ray-healthcheck.py HOST:PORT [--proc /proc]"""
import argparse
import subprocess
import sys
from pathlib import Path


def raylet_running(proc: Path) -> bool:
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv0 = cmdline.read_bytes().split(b"\0", 1)[0]
        except OSError:  # the process ended while we looked
            continue
        if Path(argv0.decode(errors="replace")).name == "raylet":
            return True
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("--proc", type=Path, default=Path("/proc"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not raylet_running(args.proc):
        print("no raylet process runs here", file=sys.stderr)
        return 1
    status = subprocess.run(["ray", "status", f"--address={args.address}"], capture_output=True, text=True)
    if status.returncode != 0:
        print(f"ray status --address={args.address}: {status.stderr.strip()[-500:]}", file=sys.stderr)
    return status.returncode


if __name__ == "__main__":
    sys.exit(main())
