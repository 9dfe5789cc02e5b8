"""One driver per study: the lock row is taken atomically (two drivers started at once on a new
or an existing database, on SQLite and PostgreSQL: exactly one wins, the other is refused naming
the winner's host and process), refreshed by the heartbeat and taken over once stale."""
import io
import multiprocessing
import os
import re
import socket
import subprocess
import sys

import optuna
import psycopg
import pytest
import yaml

from gsmsearch.search._launch import Driver
from gsmsearch.search._lock import DriverLock, DriverLockHeld, DriverLockLost
from gsmsearch.search._spec import spec_from_dict

from .conftest import TINY_SPEC

RACES = 20


def fresh_postgres(server, name):
    with psycopg.connect(f"host=127.0.0.1 port={server['port']} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:{server['port']}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A factory of new, empty databases of one kind: fresh(i) -> URL."""
    if request.param == "sqlite":
        return lambda i: f"sqlite:///{tmp_path / f'race-{i}.db'}"
    server = request.getfixturevalue("postgres_server")
    return lambda i: fresh_postgres(server, f"lock_race_{os.getpid()}_{i}")


# -- the lock on its own ---------------------------------------------------------------------


def test_a_held_lock_refuses_another_driver_naming_its_host_and_pid(database):
    url = database(0)
    first = DriverLock(url, "tiny", host="node-a", pid=4242)
    first.acquire()
    second = DriverLock(url, "tiny")
    with pytest.raises(DriverLockHeld, match=r"another driver is running study 'tiny' \(pid 4242 on node-a, "
                                             r"seen \d+s ago; .*\); wait for it or pass --force"):
        second.acquire()
    assert first.holder()["token"] == first.token
    first.refresh()  # still ours
    first.release()
    assert first.holder() is None
    second.acquire()  # free: taken at once
    assert second.holder()["pid"] == os.getpid() and second.holder()["host"] == socket.gethostname()
    second.release()


def test_a_stale_lock_is_taken_over_and_its_old_holder_learns_it_lost(database):
    """A driver on another host that stops refreshing (hard-killed, or cut off) loses the lock
    once its heartbeat is older than the stale time; its next refresh says so."""
    url = database(0)
    old = DriverLock(url, "tiny", host="node-a", pid=4242, stale_seconds=1.0)
    old.acquire()
    impatient = DriverLock(url, "tiny", stale_seconds=3600)
    with pytest.raises(DriverLockHeld):
        impatient.acquire()  # fresh for a driver that waits an hour
    import time

    time.sleep(1.2)  # the database's clock passes the stale time of the next one
    new = DriverLock(url, "tiny", stale_seconds=1.0)
    new.acquire()
    assert new.holder()["token"] == new.token
    with pytest.raises(DriverLockLost, match=rf"held by another driver now \(pid {os.getpid()} on "):
        old.refresh()
    old.release()  # deletes nothing: the row is not its own
    assert new.holder()["token"] == new.token
    new.release()


def test_a_dead_process_on_this_host_is_taken_over_at_once_and_force_takes_a_live_one(database):
    url = database(0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    gone = DriverLock(url, "tiny", pid=int(dead.stdout))  # this host, a process that has exited
    gone.acquire()
    taker = DriverLock(url, "tiny")
    taker.acquire()  # without waiting for the stale time
    assert taker.holder()["token"] == taker.token
    forcer = DriverLock(url, "tiny", host="node-b", pid=7)
    forcer.acquire(force=True)  # the holder (this process) is alive: only --force takes it
    assert forcer.holder()["host"] == "node-b"
    with pytest.raises(DriverLockLost):
        taker.refresh()


def test_read_only_commands_take_no_lock(tmp_path, capsys):
    """`status` on a study whose driver holds the lock reads it, and leaves the row alone."""
    from gsmsearch.cli import main

    spec = spec_from_dict(TINY_SPEC)
    driver = Driver(spec, tmp_path / "study.yaml", out=io.StringIO(), make_worker=lambda *a: None)
    driver.open(f"sqlite:///{tmp_path / 'tiny.db'}")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(TINY_SPEC))
    before = driver.lock.holder()
    assert main(["status", str(tmp_path / "study.yaml")]) == 0
    assert driver.lock.holder() == before
    driver.shutdown()
    assert driver.lock.holder() is None


# -- races -----------------------------------------------------------------------------------


def _contender(urls, barrier, results, name="tiny"):
    """One of two processes: for each new database, wait for the other, then open study
    ``name`` as a driver does (lock, then Optuna's tables and the study)."""
    spec = spec_from_dict({**TINY_SPEC, "name": name})
    for i, url in enumerate(urls):
        barrier.wait()
        driver = Driver(spec, "study.yaml", out=io.StringIO(), make_worker=lambda *a: None)
        try:
            driver.open(url)
            results.put((i, "won", socket.gethostname(), os.getpid(), ""))
        except DriverLockHeld as error:
            results.put((i, "refused", socket.gethostname(), os.getpid(), str(error)))
        except Exception as error:  # noqa: BLE001 - any other outcome fails the test
            results.put((i, "error", socket.gethostname(), os.getpid(), f"{type(error).__name__}: {error}"))
        barrier.wait()  # the winner holds its lock until both have finished this race


def test_two_drivers_racing_on_a_new_database_one_wins_every_time(database):
    urls = [database(i) for i in range(RACES)]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_contender, args=(urls, barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in range(2 * RACES)]
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    for i, url in enumerate(urls):
        race = sorted((o for o in outcomes if o[0] == i), key=lambda o: o[1])
        assert [o[1] for o in race] == ["refused", "won"], race
        winner, loser = race[1], race[0]
        assert f"(pid {winner[3]} on {winner[2]}, seen " in loser[4], race
        # the database is whole: Optuna's tables, one study, the winner's lock row
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["tiny"]
        holder = DriverLock(url, "tiny").holder()
        assert (holder["host"], holder["pid"]) == (winner[2], winner[3])


def test_two_drivers_of_different_studies_on_a_new_database_both_run(database):
    """Two locks, so both drivers create Optuna's tables at the same moment: the one that finds
    them half-made by the other opens them on its next try."""
    urls = [database(100 + i) for i in range(8)]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_contender, args=(urls, barrier, results, name))
                 for name in ("first", "second")]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in range(2 * len(urls))]
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert [o[1] for o in outcomes] == ["won"] * len(outcomes), [o for o in outcomes if o[1] != "won"]
    for url in urls:
        assert sorted(s.study_name for s in optuna.get_all_study_summaries(url)) == ["first", "second"]


# -- real launches -------------------------------------------------------------------------


# a new SQLite database (two drivers creating Optuna's tables at once failed "UNIQUE constraint
# failed: alembic_version") and an existing PostgreSQL study (the second driver passed a
# check-then-set lock and failed "UpdateFinishedTrialError"); a new PostgreSQL database is raced
# at the Driver.open level above
@pytest.mark.parametrize("case", ["sqlite new", "postgresql resume"])
def test_two_launches_at_once_run_the_study_once(case, tmp_path, request):
    storage = (fresh_postgres(request.getfixturevalue("postgres_server"), f"launch_race_{case.split()[1]}")
               if case.startswith("postgresql") else f"sqlite:///{tmp_path / 'tiny.db'}")
    # trials long enough that the winner still runs when the loser (starting its own Ray) asks
    spec_dict = {**TINY_SPEC, "storage": storage, "trials": 2, "concurrency": 1,
                 "workload": {**TINY_SPEC["workload"], "epochs": 40}}
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict))
    command = [sys.executable, "-m", "gsmsearch", "launch", str(spec_path), "--status-interval", "1000"]
    if case.endswith("resume"):  # a study that exists, with its driver gone
        driver = Driver(spec_from_dict(spec_dict), spec_path, out=io.StringIO(), make_worker=lambda *a: None)
        driver.open(storage)
        driver.shutdown()
        command.append("--resume")
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=400) for run in runs]
    codes = sorted((run.returncode, run.pid, err) for run, (_, err) in zip(runs, outputs))
    assert [c for c, _, _ in codes] == [0, 2], codes
    (_, winner_pid, _), (_, _, loser_err) = codes
    assert f"another driver is running study 'tiny' (pid {winner_pid} on {socket.gethostname()}," in loser_err
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert len({t.user_attrs["config_digest"] for t in trials}) == 2  # no configuration twice
    assert DriverLock(storage, "tiny").holder() is None  # the winner let go


def test_a_storage_that_cannot_hold_the_study_is_refused_at_once(tmp_path):
    """The lock is the driver's first contact with the database: what retrying cannot help is
    said at once, as opening the storage says it (not after the long retry bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once the socket is closed
    spec = spec_from_dict(TINY_SPEC)
    for url, message in [(f"sqlite:///{tmp_path}/missing/tiny.db", f"the folder {tmp_path}/missing does not exist"),
                         (f"sqlite:///{tmp_path}", "is a folder, not a database file"),
                         (f"postgresql+psycopg://postgres@127.0.0.1:{port}/x",
                          f"cannot open storage postgresql+psycopg://postgres@127.0.0.1:{port}/x: ")]:
        driver = Driver(spec, tmp_path / "study.yaml", out=io.StringIO(), make_worker=lambda *a: None)
        with pytest.raises(ValueError, match=re.escape(message)):
            driver.open(url)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
