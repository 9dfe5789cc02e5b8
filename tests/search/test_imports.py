"""``gsmsearch.search`` loads its names on first use: every public name resolves to the object of
the module that defines it, and a process that runs only what a Ray worker runs (the runner and a
whole trial) never imports the driver's stack (pydantic, Optuna, SQLAlchemy, Ray's client)."""
import json
import subprocess
import sys

import pytest

import gsmsearch.search as search


@pytest.mark.parametrize("name", sorted(search.__all__))
def test_every_public_name_resolves_to_its_definition(name):
    value = getattr(search, name)
    module = sys.modules[f"gsmsearch.search.{search._MODULE_OF[name]}"]
    assert value is getattr(module, name)
    assert name in dir(search)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        search.no_such_thing  # noqa: B018
    with pytest.raises(ImportError):
        exec("from gsmsearch.search import no_such_thing", {})


def test_what_a_worker_runs_imports_no_driver_stack(tmp_path):
    script = (
        "import json, sys\n"
        "from gsmsearch.search._runner import execute_trial\n"
        "config = {'workload': 'digits-mlp', 'workload_options': {'hidden_sizes': [32, 32]},\n"
        "          'family': 'lowrank', 'budget': 0.3, 'mode': 'scratch', 'epochs': 2, 'batch_size': 64,\n"
        "          'measure_latency': False}\n"
        f"out = execute_trial(config, {str(tmp_path / 'ck')!r}, {str(tmp_path / 'cache')!r})\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'optuna', 'sqlalchemy', 'ray', 'yaml'})\n"
        "print('RESULT ' + json.dumps({'ok': out['ok'], 'heavy': heavy}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert result["ok"] is True
    assert result["heavy"] == []
