"""Helpers of the fault tests (single-node and multi-node): read a study while its database may
be down, wait for a condition, stop/start/restart the fixtures' PostgreSQL server, and check that
a fault lost nothing."""
import subprocess
import time

import optuna


def trials(url, name="tiny"):
    """The study's trials; [] while it does not exist yet or its database is down.  One
    connection per call, closed after it (a pooled one would stay open until the garbage
    collector ran: polled every fraction of a second, past the server's max_connections)."""
    from sqlalchemy.pool import NullPool

    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except Exception:  # noqa: BLE001 - not created yet, or the server is down
        return []


def wait(predicate, timeout=240, interval=0.5):
    """``predicate()``'s first true value, polling every ``interval`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def _server_options(server):
    return server["options"]  # as the fixture started it (tests/search/conftest.py)


def pg_stop(server):
    subprocess.run(server["ctl"] + ["-m", "fast", "-w", "stop"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)


def pg_start(server):
    # the server must not inherit our pipes (it outlives pg_ctl): it logs to a file
    subprocess.run(server["ctl"] + ["-w", "-l", str(server["root"] / "log"), "start", "-o", _server_options(server)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def pg_restart(server):
    subprocess.run(server["ctl"] + ["-m", "fast", "-w", "-l", str(server["root"] / "log"), "restart", "-o",
                                    _server_options(server)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def finished(study_trials):
    """number -> (values, config digest) of every completed trial."""
    return {t.number: (t.values, t.user_attrs["config_digest"]) for t in study_trials if t.state.name == "COMPLETE"}


def assert_nothing_lost(url, before, expected, name="tiny"):
    """After a fault and whatever followed it: the trials finished ``before`` it (:func:`finished`)
    are intact, ``expected`` trials completed, none is left RUNNING or WAITING, and no completed
    configuration ran twice.  Returns the study's trials."""
    study_trials = trials(url, name)
    assert study_trials, "the study is not readable"
    left = [(t.number, t.state.name) for t in study_trials if t.state.name in ("RUNNING", "WAITING")]
    assert not left, left
    after = finished(study_trials)
    assert {n: v for n, v in after.items() if n in before} == before  # intact: same values, same config
    digests = [digest for _, digest in after.values()]
    assert len(digests) == len(set(digests)) == expected, digests
    return study_trials
