"""``gsmsearch.search`` loads its names on first use: every public name resolves to the object of
the module that defines it, and a process that runs only what a Ray worker runs (the runner and a
whole trial) never imports the driver's stack (pydantic, Optuna, SQLAlchemy, Ray's client)."""
import sys

import pytest

import gsmsearch.search as search
from tests.fresh_process import fresh_python


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
    result = fresh_python(script)
    assert result["ok"] is True
    assert result["heavy"] == []
