"""Run a check script in a fresh Python (nothing imported yet, optionally another environment)
and return what it reports: the script prints ``RESULT <json>`` as its last such line."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_python(script: str, *, env: dict = None, timeout: int = 300) -> dict:
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
