"""Storage URLs: ${VAR} expansion in SQLite paths, relative paths beside the spec, passwords."""
import pytest

from gsmsearch.search._spec import check_storage_url
from gsmsearch.search._storage import open_storage, resolve_storage_url


def test_sqlite_path_from_an_absolute_variable_is_used_as_is(tmp_path, monkeypatch):
    target = tmp_path / "shared"
    target.mkdir()
    monkeypatch.setenv("STUDY_DIR", str(target))
    spec_dir = tmp_path / "specs"
    url = resolve_storage_url("sqlite:///${STUDY_DIR}/x.db", spec_dir=spec_dir, study_name="s")
    assert url == "sqlite:///${STUDY_DIR}/x.db"  # kept as written, expanded when opened
    open_storage(url)
    assert (target / "x.db").is_file()
    assert not spec_dir.exists()


def test_sqlite_path_from_a_relative_variable_is_beside_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("SUB", "runs")
    (tmp_path / "runs").mkdir()
    url = resolve_storage_url("sqlite:///${SUB}/x.db", spec_dir=tmp_path, study_name="s")
    assert "${SUB}" in url
    open_storage(url)
    assert (tmp_path / "runs" / "x.db").is_file()


def test_unset_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    url = resolve_storage_url("sqlite:///${NOT_SET_ANYWHERE}/x.db", spec_dir=tmp_path, study_name="s")
    with pytest.raises(ValueError, match=r"uses \$\{NOT_SET_ANYWHERE\}, which is not set"):
        open_storage(url)


def test_plain_relative_and_default_paths(tmp_path):
    assert resolve_storage_url("sqlite:///a/b.db", spec_dir=tmp_path, study_name="s") == \
        f"sqlite:///{tmp_path.resolve() / 'a' / 'b.db'}"
    assert resolve_storage_url(None, spec_dir=tmp_path, study_name="s") == f"sqlite:///{tmp_path.resolve() / 's.db'}"
    assert resolve_storage_url("sqlite:////abs/c.db", spec_dir=tmp_path, study_name="s") == "sqlite:////abs/c.db"


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://user:${PGPW}@db.example/studies",
    "postgresql+psycopg://user@${DB_HOST}:5432/studies",
    "postgresql+psycopg://user@db.example/studies",
])
def test_urls_without_a_literal_password_are_accepted(url):
    assert check_storage_url(url) == url


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://user:hunter2@db.example/studies",
    "postgresql+psycopg://user:hunter2@${DB_HOST}/studies",
    "postgresql+psycopg://user:hunter2@db.example/studies?application_name=${USER}",
    "postgresql+psycopg://user:pre${PGPW}@db.example/studies",
])
def test_literal_passwords_are_refused_even_beside_a_variable(url):
    with pytest.raises(ValueError, match="do not write a password into the spec"):
        check_storage_url(url)
    assert check_storage_url(url, allow_password=True) == url


def test_sqlite_path_that_cannot_be_a_database_fails_at_once(tmp_path):
    """Said before any connection attempt (the retries are for locks and restarts)."""
    with pytest.raises(ValueError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path}/missing/x.db")
    with pytest.raises(ValueError, match="is a folder, not a database file"):
        open_storage(f"sqlite:///{tmp_path}")
    assert sorted(tmp_path.iterdir()) == []
