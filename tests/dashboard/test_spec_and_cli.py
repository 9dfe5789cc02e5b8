"""Dashboard specs are validated like study specs; the report command; read-only storage; the
dashboard command's refusals."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gsmsearch.cli import main
from gsmsearch.dashboard import DataCache, load_dashboard_spec, readonly_storage, render_report, resolve_sources
from gsmsearch.search import SpecError

from .conftest import HOSTILE_REASONS

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, data, name="dash.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data, message", [
    ({"studies": [{"study": "a", "storage": "sqlite:///a.db"}], "colour": "red"}, r"colour: unknown key"),
    ({"studies": []}, r"studies: .*at least 1"),
    ({"studies": [{"study": "a"}]}, r"studies\[0\] \('a'\) needs a storage"),
    ({"storage": "sqlite:///a.db", "studies": [{"study": "a", "spec": "s.yaml"}]},
     r"studies\[0\]: .*exactly one of study .* or spec"),
    ({"storage": "sqlite:///a.db", "studies": [{"study": "a"}], "axes": {"x": "quality", "y": "relative_flops"}},
     r"axes: .*x is the cost axis"),
    ({"storage": "sqlite:///a.db", "studies": [{"study": "a"}], "axes": {"x": "flopz"}},
     r"axes\.x: unknown metric 'flopz'"),
    ({"storage": "sqlite:///a.db", "studies": [{"study": "a"}], "budgets": [0.1, -1]},
     r"budgets: budgets are positive numbers"),
    ({"storage": "postgresql://u:secret@h/db", "studies": [{"study": "a"}]}, r"storage: do not write a password"),
    ({"storage": "redis://h", "studies": [{"study": "a"}]}, r"storage: unsupported database 'redis'"),
    ({"storage": "sqlite:///a.db", "studies": [{"study": "a"}], "refresh_seconds": 0},
     r"refresh_seconds: .*greater than or equal to 1"),
    ({"storage": "sqlite:///a.db", "studies": [{"study": "a"}], "references": [{"label": "x", "x": 1}]},
     r"references\[0\]\.y: required key is missing"),
    ({"storage": "sqlite:///a.db", "studies": [{"study": "a"}], "families": ["gblr", "lowrnk"]},
     r"families\[1\]: unknown family 'lowrnk'; expected one of: dense, .*lowrank"),
])
def test_bad_dashboard_specs_name_file_and_key(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(SpecError, match=message) as error:
        load_dashboard_spec(path)
    assert str(error.value).startswith(str(path))


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_dashboard_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+, column \d+"):
        load_dashboard_spec(_write(tmp_path, "studies: [a\n"))
    with pytest.raises(SpecError, match="expected a mapping"):
        load_dashboard_spec(_write(tmp_path, "- a\n"))


def test_shipped_dashboard_specs_are_valid():
    paths = sorted((REPO / "dashboards").glob("*.yaml"))
    assert paths, "dashboards/*.yaml: at least one example"
    for path in paths:
        spec = load_dashboard_spec(path)
        assert spec.studies


def test_relative_storage_is_relative_to_the_spec(tmp_path, seeded_db):
    db_path, _, _, second = seeded_db
    (tmp_path / "dashboards").mkdir()
    os.symlink(db_path, tmp_path / "studies.db")
    path = _write(tmp_path / "dashboards", {"storage": "sqlite:///../studies.db", "studies": [{"study": second}]})
    sources = resolve_sources(load_dashboard_spec(path), path.parent)
    assert sources[0].url == f"sqlite:///{(tmp_path / 'studies.db').resolve()}"
    assert not DataCache(sources).views()[0].error


def _tags(text):
    """(tag, attributes) of every element the browser would build from ``text``."""
    from html.parser import HTMLParser

    found = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, dict(attrs)))

    Collect(convert_charrefs=True).feed(text)
    return found


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


def test_storage_is_read_only_at_the_database_level(seeded_db):
    db_path, url, name, _ = seeded_db
    before = _digest(db_path)
    storage = readonly_storage(url)
    study_id = storage.get_study_id_from_name(name)
    writes = [lambda: storage.set_study_user_attr(study_id, "tampered", True),
              lambda: storage.create_new_study([], "new-study"),
              lambda: storage.delete_study(study_id)]
    for write in writes:
        with pytest.raises(Exception) as error:
            write()
        # Optuna wraps the driver's error; the cause is SQLite refusing the write
        assert "readonly database" in f"{error.value} {error.value.__cause__}"
    assert _digest(db_path) == before


def test_missing_database_is_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="no study database"):
        readonly_storage(f"sqlite:///{tmp_path / 'nothing.db'}")
    assert not (tmp_path / "nothing.db").exists()


def test_report_command_writes_one_self_contained_file(tmp_path, seeded_db, capsys):
    db_path, url, name, _ = seeded_db
    before = _digest(db_path)
    output = tmp_path / "report.html"
    assert main(["report", "--storage", url, name, "-o", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out
    text = output.read_text()
    assert _digest(db_path) == before
    # plotly.js inlined exactly once, nothing loaded from elsewhere
    assert text.count("<script>") == 2  # plotly.js and ours; figures are JSON data blocks
    tags = _tags(text)
    assert not {t for t, _ in tags} & {"link", "img", "iframe", "object", "embed", "svg", "a", "base"}
    assert not [(t, a) for t, attrs in tags for a in attrs if a in ("src", "href") or a.startswith("on")]
    assert [attrs.get("type") for t, attrs in tags if t == "script"].count(None) == 2
    # hostile text appears only escaped (or inside JSON as \u003c), never as markup
    assert "<script>window.__xss" not in text and '<img src=x onerror' not in text
    assert "&lt;b&gt;bold&lt;/b&gt;&lt;script&gt;window.__xss" in text
    assert "&lt;img src=x onerror=" in text
    assert "Content-Security-Policy" in text and "connect-src 'none'" in text


def test_report_from_a_study_spec_and_a_dashboard_spec(tmp_path, seeded_db, capsys):
    _, url, _, second = seeded_db
    study_spec = _write(tmp_path, {"name": second, "storage": url, "trials": 1, "families": {"gblr": {}},
                                   "workload": {"name": "digits-mlp"}}, "study.yaml")
    os.chdir(tmp_path)
    assert main(["report", str(study_spec)]) == 0
    assert (tmp_path / "study-report.html").is_file()
    dash = _write(tmp_path, {"title": "two", "storage": url, "studies": [{"study": second}, {"spec": "study.yaml"}]})
    assert main(["report", str(dash), "-o", "two.html"]) == 0
    assert "2 studies" in capsys.readouterr().out
    # --storage alone: every study in it, or the --study ones
    assert main(["report", "--storage", url, "-o", "all.html"]) == 0
    assert "2 studies" in capsys.readouterr().out and (tmp_path / "all.html").is_file()
    assert main(["report", "--storage", url, "--study", second, "-o", "one.html"]) == 0
    assert "1 study" in capsys.readouterr().out
    assert second in (tmp_path / "one.html").read_text()


def test_report_errors_are_one_line(tmp_path, seeded_db, capsys):
    _, url, _, _ = seeded_db
    assert main(["report", "nope", "--storage", url]) == 2
    assert "no study 'nope' in that storage" in capsys.readouterr().err
    assert main(["report", "nope"]) == 2
    assert "give --storage URL with a study name" in capsys.readouterr().err
    assert main(["report", str(_write(tmp_path, {"studies": [{"study": "a"}]}))]) == 2
    assert "needs a storage" in capsys.readouterr().err


def test_render_report_escapes_everything(seeded_db):
    _, url, name, _ = seeded_db
    from gsmsearch.dashboard import dashboard_spec_from_dict, sources_in_storage

    spec = dashboard_spec_from_dict({"title": "<i>t</i>", "storage": url, "studies": [{"study": name}],
                                     "references": [{"label": "<svg onload=x>", "x": 1, "y": 0.9}]})
    html = render_report(DataCache(sources_in_storage(url, [name])).views(), spec)
    assert "<i>t</i>" not in html and "&lt;i&gt;t&lt;/i&gt;" in html
    assert "<svg onload" not in html
    for reason in HOSTILE_REASONS:
        assert reason not in html


def test_dashboard_refuses_non_loopback_hosts(capsys):
    assert main(["dashboard", "--storage", "sqlite:///x.db", "--host", "0.0.0.0"]) == 2
    assert "pass --allow-remote" in capsys.readouterr().err
    assert main(["dashboard", "--storage", "sqlite:///x.db", "--host", "192.168.1.5", "--port", "9"]) == 2
    assert main(["dashboard"]) == 2
    assert "give a dashboard or study spec, or --storage" in capsys.readouterr().err


def test_help_stays_instant():
    code = ("import sys, gsmsearch.cli as c; c.build_parser(); "
            "heavy = [m for m in ('dash', 'plotly', 'flask', 'optuna', 'torch', 'ray') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _copied_db(tmp_path, seeded_db):
    """A private copy of the seeded database (a test that fails must not damage the shared one)."""
    import shutil

    db_path, _, _, second = seeded_db
    copy = tmp_path / "studies.db"
    shutil.copy(db_path, copy)
    return copy, f"sqlite:///{copy}", second


def test_export_and_report_refuse_to_overwrite_the_database_or_a_spec(tmp_path, seeded_db, capsys, monkeypatch):
    db, url, second = _copied_db(tmp_path, seeded_db)
    monkeypatch.chdir(tmp_path)
    os.symlink(db, tmp_path / "link.db")
    (tmp_path / "sub").mkdir()
    other = tmp_path / "other.db"  # another study's database: never an export target either
    other.write_bytes(db.read_bytes())
    study_spec = _write(tmp_path, {"name": second, "storage": url, "trials": 1, "families": {"gblr": {}},
                                   "workload": {"name": "digits-mlp"}}, "study.yaml")
    dash = _write(tmp_path, {"title": "t", "studies": [{"spec": "study.yaml"}]}, "dash.yaml")
    kept = {p: _digest(p) for p in (db, other, study_spec, dash)}
    cases = [("study's database", str(db)), ("study's database", "link.db"), ("study's database", "sub/../studies.db"),
             ("SQLite database", str(other))]
    commands = [["export", study_spec.name], ["export", second, "--storage", url, "--format", "parquet"],
                ["report", str(dash)], ["report", second, "--storage", url]]
    for command in commands:
        for what, output in cases:
            assert main([*command, "-o", output]) == 2, (command, output)
            err = capsys.readouterr().err
            assert f"refusing to overwrite {output}: it is " in err and what in err, err
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    for command, spec in [(["export", "study.yaml"], "study.yaml"), (["report", "dash.yaml"], "dash.yaml"),
                          (["report", "dash.yaml"], "study.yaml"), (["report", "study.yaml"], str(study_spec))]:
        assert main([*command, "-o", spec]) == 2, (command, spec)
        assert f"refusing to overwrite {spec}: it is the spec file" in capsys.readouterr().err
    assert {p: _digest(p) for p in kept} == kept
    assert os.path.islink(tmp_path / "link.db")
    # an earlier export or report of the same kind is overwritten as before
    for command, output in [(["export", "study.yaml"], "trials.csv"), (["report", "dash.yaml"], "r.html")]:
        assert main([*command, "-o", output]) == 0
        assert main([*command, "-o", output]) == 0
        assert "wrote" in capsys.readouterr().out


def test_export_and_report_name_a_bad_output_path(tmp_path, seeded_db, capsys, monkeypatch):
    _, url, second = _copied_db(tmp_path, seeded_db)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in (["export", second, "--storage", url], ["report", second, "--storage", url]):
        for output, message in [("no/such/dir/x.out", "its folder {} does not exist".format(tmp_path / "no/such/dir")),
                                (".", "is a directory"), (str(tmp_path), "is a directory"),
                                ("afile/x.out", f"{tmp_path / 'afile'} is not a folder")]:
            assert main([*command, "-o", output]) == 2, (command, output)
            err = capsys.readouterr().err
            assert f"-o/--output {output}: {message}" in err and "unexpected" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


class _FakeApp:
    """Stands in for the Dash app: records whether the dashboard would have served."""

    served = []

    def run(self, **kwargs):
        self.served.append(kwargs)


def test_dashboard_refuses_when_no_study_can_be_read(tmp_path, seeded_db, capsys, monkeypatch):
    import optuna

    import gsmsearch.dashboard as dashboard

    _, url, _ = _copied_db(tmp_path, seeded_db)
    _FakeApp.served = []
    monkeypatch.setattr(dashboard, "create_app", lambda spec, cache: _FakeApp())
    dash = _write(tmp_path, {"storage": url, "studies": [{"study": "nosuch"}, {"study": "nor-this"}]})
    assert main(["dashboard", str(dash), "--port", "8059"]) == 2
    err = capsys.readouterr().err
    assert "none of the studies could be read" in err and "Traceback" not in err
    assert not _FakeApp.served
    # one readable study is enough to serve (the other is warned about)
    dash = _write(tmp_path, {"storage": url, "studies": [{"study": "nosuch"}, {"study": "second-sampler"}]})
    assert main(["dashboard", str(dash), "--port", "8059"]) == 0 and len(_FakeApp.served) == 1
    assert "warning" in capsys.readouterr().err
    # discover mode (--storage alone): an empty storage is legitimate, studies may come later
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.storages.RDBStorage(empty)
    assert main(["dashboard", "--storage", empty, "--port", "8059"]) == 0 and len(_FakeApp.served) == 2


def test_a_study_name_too_long_for_a_file_name(tmp_path, seeded_db, capsys):
    """Study names are not file names: a 300-character one gets the usual one-line error (not an
    OSError from asking whether it is a file), and a report of it gets a short default file name."""
    _, url, _, _ = seeded_db
    long_name = "n" * 300
    assert main(["status", long_name, "--storage", url]) == 2
    assert main(["report", long_name, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "no study" in err and "OSError" not in err and "unexpected" not in err
    db = tmp_path / "long.db"
    from .conftest import MAIN_TRIALS, seed_study

    seed_study(f"sqlite:///{db}", long_name, MAIN_TRIALS)
    os.chdir(tmp_path)
    assert main(["report", long_name, "--storage", f"sqlite:///{db}"]) == 0
    written = [p.name for p in tmp_path.glob("*-report.html")]
    assert written == ["n" * 100 + "-report.html"], written
