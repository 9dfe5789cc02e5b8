"""Run a check script in a fresh Python with Triton's CPU interpreter (``TRITON_INTERPRET=1``,
which Triton reads when a kernel is defined, so it cannot be switched on inside this process).
The script prints ``RESULT <json>`` as its last such line; that dict is returned."""
import os

from tests.fresh_process import ROOT, fresh_python


def interpreted(script: str, timeout: int = 300) -> dict:
    return fresh_python(script, env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT), timeout=timeout)
