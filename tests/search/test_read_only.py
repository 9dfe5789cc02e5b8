"""Commands that read (`status`, `list`, `export`, `report`) never write to a storage: no Optuna
tables in a foreign database, no file created for a missing SQLite path, a study's database
left byte for byte as it was."""
import hashlib
import os
import sqlite3

import optuna
import pytest
import sqlalchemy

from gsmsearch.cli import main

from .test_hostile_input import _seed, one_error_line


def _read_commands(url, tmp_path):
    return [
        ["list", "--storage", url],
        ["status", "seeded", "--storage", url],
        ["export", "seeded", "--storage", url, "-o", str(tmp_path / "out.csv")],
        ["report", "seeded", "--storage", url, "-o", str(tmp_path / "out.html")],
    ]


def _tables(url):
    engine = sqlalchemy.create_engine(url)
    try:
        return sorted(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _foreign_sqlite(path):
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()


def _fingerprint(path):
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_commands_leave_a_foreign_sqlite_database_alone(tmp_path, capsys):
    db = tmp_path / "app.db"
    _foreign_sqlite(db)
    url = f"sqlite:///{db}"
    before = _fingerprint(db)
    for argv in _read_commands(url, tmp_path):
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err)
        if argv[0] != "report":  # the dashboard's reader says it its own way
            assert f"no gsmsearch/Optuna study in {url}" in line, line
        assert _tables(url) == ["users"], argv
        assert _fingerprint(db) == before, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_read_commands_do_not_create_a_missing_sqlite_file(tmp_path, capsys):
    db = tmp_path / "missing.db"
    for argv in _read_commands(f"sqlite:///{db}", tmp_path):
        assert main(argv) == 2, argv
        assert f"no study database at {db}" in one_error_line(capsys.readouterr().err), argv
        assert not db.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_commands_leave_a_study_database_byte_for_byte(tmp_path, capsys):
    db = tmp_path / "studies.db"
    _seed(f"sqlite:///{db}")
    before = _fingerprint(db)
    for argv in _read_commands(f"sqlite:///{db}", tmp_path)[:3]:
        assert main(argv) == 0, capsys.readouterr().err
        assert _fingerprint(db) == before, argv
    out = capsys.readouterr().out
    assert "seeded" in out and "wrote 2 trials" in out
    assert not (tmp_path / "studies.db-journal").exists()


def test_read_commands_leave_a_foreign_postgres_database_alone(tmp_path, postgres_url, capsys):
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE users (id serial PRIMARY KEY, name text)"))
    engine.dispose()
    for argv in _read_commands(postgres_url, tmp_path):
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err)
        if argv[0] != "report":
            assert "no gsmsearch/Optuna study in postgresql+psycopg://postgres@127.0.0.1" in line, line
        assert _tables(postgres_url) == ["users"], argv
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_commands_read_a_postgres_study_through_read_only_connections(tmp_path, postgres_url, capsys):
    _seed(postgres_url)
    tables = _tables(postgres_url)
    for argv in _read_commands(postgres_url, tmp_path)[:3]:
        assert main(argv) == 0, capsys.readouterr().err
    assert "wrote 2 trials" in capsys.readouterr().out
    assert _tables(postgres_url) == tables
    from gsmsearch.search._storage import open_readonly_storage

    storage = open_readonly_storage(postgres_url)
    with pytest.raises(optuna.exceptions.StorageInternalError) as error:
        storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "should-not-exist")
    assert "read-only transaction" in str(error.value.__cause__)
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        names = conn.execute(sqlalchemy.text("SELECT study_name FROM studies")).scalars().all()
    engine.dispose()
    assert names == ["seeded"]
