"""Run a check script in a fresh Python with Triton's CPU interpreter (``TRITON_INTERPRET=1``,
which Triton reads when a kernel is defined, so it cannot be switched on inside this process).
The script prints ``RESULT <json>`` as its last such line; that dict is returned."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def interpreted(script: str, timeout: int = 300) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
