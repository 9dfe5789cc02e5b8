"""The dashboard and the report in real Chromium (Debian's package, driven by Playwright).

A server is started by the test on 127.0.0.1 (a free port) over a seeded SQLite study; the tests
check that every view renders with the expected traces and points and no console errors, that
clicking a trial opens its structure heatmaps, that hostile study names and failure messages show
as text, that the database is not changed by serving, that the page follows a study as it grows,
and that the static report works from a file URL with every network request refused.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import (HOSTILE_NAME, HOSTILE_REASONS, MAIN_POINTS, MAIN_TRACES, SECOND_TRACES, SECOND_TRIALS,
                       free_port)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found; scripts/test-services.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.errors = errors
    yield page
    context.close()


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


@pytest.fixture(scope="module")
def server(seeded_db, tmp_path_factory):
    """`gsmsearch dashboard --storage ...` in a subprocess on 127.0.0.1, over a copy of the
    seeded database (the last test adds a trial to it)."""
    db = tmp_path_factory.mktemp("served") / "studies.db"
    shutil.copy(seeded_db[0], db)
    url = f"sqlite:///{db}"
    before = _digest(db)
    process, address = start_dashboard(url)
    yield {"address": address, "db": db, "url": url, "before": before, "process": process}
    stop(process)


def start_dashboard(url: str):
    """`gsmsearch dashboard --storage URL` on a free loopback port, once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gsmsearch", "dashboard", "--storage", url, "--port", str(port), "--refresh", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            pytest.fail(f"the dashboard exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(address, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.terminate()
            pytest.fail("the dashboard did not answer within 60 s")
        time.sleep(0.2)
    return process, address


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def _count(page, selector: str) -> int:
    return page.eval_on_selector_all(selector, "els => els.length")


def _wait_count(page, selector: str, expected: int) -> None:
    page.wait_for_function("([s, n]) => document.querySelectorAll(s).length === n", arg=[selector, expected])


def _wait_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => (document.querySelector(s) || {innerText: ''}).innerText.includes(t)",
                           arg=[selector, text])


def test_every_view_renders_with_the_expected_traces_and_points(page, server):
    page.goto(server["address"])
    page.wait_for_selector("#pareto-0 .js-plotly-plot .trace")
    _wait_count(page, "#pareto-0 .scatterlayer .trace", MAIN_TRACES)
    assert _count(page, "#pareto-0 .scatterlayer .point") == MAIN_POINTS
    # the second study, side by side
    _wait_count(page, "#pareto-1 .scatterlayer .trace", SECOND_TRACES)
    assert _count(page, "#pareto-1 .scatterlayer .point") == len(SECOND_TRIALS)
    # GBLR against lowrank and monarch: gblr front + dominated, the family's traces, the dense star
    _wait_count(page, "#compare-0 .scatterlayer .trace", (2 + 2 + 1) + (2 + 1 + 1))
    assert _count(page, "#compare-0 .subplot") >= 2
    _wait_count(page, "#compare-1 .scatterlayer .trace", 2)
    # hypervolume: one bar per family; history lines for gblr, lowrank, monarch and all families
    _wait_count(page, "#hypervolume-0 .barlayer .point", 4)
    assert _count(page, "#hypervolume-0 .scatterlayer .trace") == 4
    # best quality at budget: one table per study, one row per family
    _wait_count(page, ".budget-table", 2)
    assert _count(page, ".budget-table >> nth=0 >> tbody tr") == 4
    # the trial table: every trial of both studies (16 + 4) on its first page
    _wait_count(page, 'td[data-dash-column="number"]', 20)
    assert page.errors == []


def test_hostile_names_and_failure_messages_render_as_text(page, server):
    page.goto(server["address"])
    page.wait_for_selector("#pareto-0 .js-plotly-plot .trace")
    page.wait_for_selector('td[data-dash-column="failure reason"]')
    assert HOSTILE_NAME in page.inner_text("#studies")
    title = page.text_content("#pareto-0 .gtitle")
    assert HOSTILE_NAME in title
    reasons = page.eval_on_selector_all('td[data-dash-column="failure reason"]', "els => els.map(e => e.innerText)")
    for reason in HOSTILE_REASONS:
        assert reason in reasons
    assert page.evaluate("() => window.__xss") is None
    assert _count(page, "img") == 0
    assert page.errors == []


def test_clicking_a_trial_opens_its_structure(page, server):
    page.goto(server["address"])
    page.wait_for_selector("#pareto-0 .scatterlayer .trace .point")
    # the first point of GBLR's front (lowest cost: trial 0)
    box = page.locator("#pareto-0 .scatterlayer .trace").first.locator(".point").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#pareto-0 .hoverlayer .hovertext")
    assert "trial 0" in page.text_content("#pareto-0 .hoverlayer")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#detail-title")
    assert "trial 0 (gblr)" in page.inner_text("#detail-title")
    _wait_count(page, ".structure-heatmap .heatmaplayer .hm", 2)  # one heatmap per GBLR layer
    _wait_count(page, "#detail-flops .barlayer .point", 4)  # 2 layers x (structured, dense)
    # a row of the table opens a hand-crafted trial: no heatmap, its per-layer FLOPs
    page.locator('td[data-dash-column="number"]', has_text="7").first.click()
    page.wait_for_function("t => document.querySelector('#detail-title').innerText.includes(t)",
                           arg="trial 7 (lowrank)")
    assert _count(page, ".structure-heatmap") == 0
    _wait_count(page, "#detail-flops .barlayer .point", 4)
    assert page.errors == []


def test_serving_does_not_change_the_database(server):
    assert _digest(server["db"]) == server["before"]


def test_an_unchanged_study_is_not_redrawn(page, server):
    """The page refreshes every second here, but redraws only what changed: a figure redrawn
    with the same data loses its hover label (and, under load, the click in progress on it)
    and the table its active cell."""
    page.goto(server["address"])
    _wait_count(page, "#pareto-0 .scatterlayer .point", MAIN_POINTS)
    page.wait_for_timeout(1500)  # the first refresh after the page's own first render
    page.evaluate("""() => { window.__redraws = 0;
        document.querySelectorAll('.js-plotly-plot').forEach(
            g => g.on('plotly_afterplot', () => { window.__redraws += 1; })); }""")
    requests = []
    page.on("request", lambda r: requests.append(r.url) if "_dash-update-component" in r.url else None)
    page.wait_for_timeout(3500)  # three refresh intervals
    assert len(requests) >= 3  # the refresh did run
    assert page.evaluate("() => window.__redraws") == 0
    assert page.errors == []


def test_the_page_follows_a_running_study(page, server):
    import warnings

    import optuna

    page.goto(server["address"])
    _wait_count(page, "#pareto-0 .scatterlayer .point", MAIN_POINTS)
    from .conftest import _complete

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=HOSTILE_NAME, storage=server["url"])
        study.add_trial(_complete("gblr", 0.05, 0.83, 99))
    _wait_count(page, "#pareto-0 .scatterlayer .point", MAIN_POINTS + 1)
    assert page.errors == []


def test_a_dashboard_of_a_whole_storage_starts_empty_and_shows_studies_launched_later(page, tmp_path):
    """A fresh database with no Optuna tables yet (a new PostgreSQL in the compose setup; here an
    empty SQLite file): the dashboard serves, says there are no studies, and shows a study
    created afterwards, listed with its figures at the next refreshes, without a reload."""
    from .conftest import MAIN_TRIALS, seed_study

    db = tmp_path / "fresh.db"
    db.touch()
    url = f"sqlite:///{db}"
    process, address = start_dashboard(url)
    try:
        page.goto(address)
        _wait_text(page, "#studies", "No studies in this storage yet")
        assert _count(page, "#pareto-0") == 0
        seed_study(url, "launched-later", MAIN_TRIALS)
        _wait_text(page, "#studies", "launched-later")
        _wait_count(page, "#pareto-0 .scatterlayer .point", len(MAIN_TRIALS))  # no reload needed
        assert "No studies" not in page.inner_text("#studies")
        assert page.errors == []
    finally:
        stop(process)


def test_static_report_works_from_a_file_url_without_network(page, seeded_db, tmp_path):
    _, url, _, _ = seeded_db
    output = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "gsmsearch", "report", "--storage", url, HOSTILE_NAME, "-o", str(output)],
                   check=True, capture_output=True)
    refused = []

    def only_files(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", only_files)
    page.goto(output.as_uri())
    page.wait_for_selector(".js-plotly-plot .trace")
    _wait_count(page, "#pareto-0 .scatterlayer .trace", MAIN_TRACES)
    assert _count(page, "#pareto-0 .scatterlayer .point") == MAIN_POINTS
    _wait_count(page, "#compare-0 .scatterlayer .trace", (2 + 2 + 1) + (2 + 1 + 1))
    _wait_count(page, "#hypervolume-0 .barlayer .point", 4)
    _wait_count(page, ".budget-table tbody tr", 4)
    assert _count(page, "#trials-table tbody tr") == 16
    # filter and sort work in the page
    page.select_option("#filter-state", "FAIL")
    assert page.inner_text("#filter-count") == "2 of 16 trials"
    page.select_option("#filter-state", "")
    # hostile text is text
    assert HOSTILE_NAME in page.inner_text("#studies")
    assert HOSTILE_REASONS[0] in page.inner_text("#trials-table")
    assert page.evaluate("() => window.__xss") is None
    # clicking the cheapest GBLR front point opens its structure
    box = page.locator("#pareto-0 .scatterlayer .trace").first.locator(".point").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector('.trial-detail[data-trial="0:0"]:not([hidden])')
    _wait_count(page, ".trial-detail:not([hidden]) .heatmaplayer .hm", 2)
    assert refused == []
    assert page.errors == []


def test_a_study_run_with_several_seeds_draws_means_with_error_bars(page, multi_seed_db):
    """One point per configuration at its means, with the sample std as error bars (x only for
    GBLR, whose FLOPs vary with the seed), and the per-configuration table."""
    from .conftest import SEEDED_POINTS

    process, address = start_dashboard(multi_seed_db[1])
    try:
        page.goto(address)
        _wait_count(page, "#pareto-0 .scatterlayer .point", SEEDED_POINTS)
        traces = page.evaluate("""() => document.querySelector('#pareto-0 .js-plotly-plot').data.map(
            t => ({name: t.name, x: (t.error_x || {}).array || null, y: (t.error_y || {}).array || null}))""")
        bars = {t["name"]: t for t in traces}
        assert bars["gblr ± std (y)"]["y"] == [pytest.approx(0.01, rel=1e-9), pytest.approx(0.02 ** 0.5 / 10)]
        assert bars["gblr ± std (x)"]["x"] == [pytest.approx(0.01, rel=1e-9)]
        assert "lowrank ± std (x)" not in bars and len(bars["lowrank ± std (y)"]["y"]) == 2
        # drawn: a y bar per configuration with two or more seeds (gblr 0.2 and 0.3, lowrank x 2,
        # dense), an x bar for gblr at 0.2; none for the configuration with one seed
        assert _count(page, "#pareto-0 .errorbar path.yerror") == 5
        assert _count(page, "#pareto-0 .errorbar path.xerror") == 1
        lengths = page.eval_on_selector_all("#pareto-0 .errorbar path.yerror",
                                            "els => els.map(e => e.getBBox().height)")
        assert min(lengths) > 5  # bars, not the caps a missing value would draw
        assert "mean ± std over seeds" in page.text_content("#pareto-0 .ytitle")
        page.wait_for_selector("#section-configurations", state="visible")
        _wait_count(page, '#configurations td[data-dash-column="n"]', SEEDED_POINTS)
        assert "seed 2 (trial 15)" in page.inner_text("#configurations")
        assert page.errors == []
    finally:
        stop(process)


@pytest.fixture(scope="module")
def odd_server(odd_db):
    """The dashboard of a whole storage of odd studies (see ``seed_odd_studies``), 13+ of them."""
    process, address = start_dashboard(odd_db[1])
    server = {"address": address, "process": process}
    yield server
    if process.poll() is None:
        stop(process)


def _open_trial(page, study: str, number: int) -> None:
    """Filter the trials table on a study and click one of its trials' rows."""
    box = page.locator('#trials th.dash-filter[data-dash-column="study"] input[type=text]')
    box.fill(study)
    box.press("Enter")
    page.locator('td[data-dash-column="number"]', has_text=str(number)).first.click()
    _wait_text(page, "#detail-title", f"trial {number} (")


def test_a_storage_of_odd_studies_renders_every_study_without_errors(page, odd_server):
    from .conftest import ODD_NAME, ODD_STUDIES

    page.goto(odd_server["address"])
    _wait_count(page, "#section-pareto .js-plotly-plot", len(ODD_STUDIES))
    _wait_count(page, ".js-plotly-plot", 3 * len(ODD_STUDIES))
    _wait_text(page, "#studies", ODD_NAME)
    listed = page.inner_text("#studies")
    assert all(name in listed for name in ODD_STUDIES)
    # studies with nothing to draw say why; the others draw their points
    _wait_text(page, "#pareto-0", "record no structure family")
    _wait_text(page, "#pareto-2", "no trials yet")
    _wait_count(page, f"#pareto-{ODD_STUDIES.index('odd-families')} .scatterlayer .point", 4)
    # a huge learned layer is drawn block-averaged; malformed layer records are listed as notes
    _open_trial(page, "odd-layers", 0)
    _wait_count(page, ".structure-heatmap .heatmaplayer .hm", 1)
    _open_trial(page, "odd-layers", 5)
    _wait_text(page, ".structure-notes", "interval 0 is not [row_start, row_len, col_start, col_len]")
    page.wait_for_timeout(1500)  # a refresh or two
    assert page.errors == []
    stop(odd_server["process"])
    output = odd_server["process"].stdout.read()
    assert "Traceback" not in output and "Exception on" not in output, output[-3000:]
