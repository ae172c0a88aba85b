"""The HTML report and ``autoprune dashboard`` in a real browser: headless Chromium through selenium.

Each test loads its page, waits until the front's markers are in the DOM (on
state, never a fixed sleep), counts them, checks the browser logged no error
and saves a screenshot under ``tests/artifacts/`` (gitignored). Without
Chromium (``apt-get install chromium chromium-driver``) or selenium they skip,
saying so; ``.ci/run`` fails if they skipped where Chromium could be installed.
"""

import os
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from autoprune.cli import main
from autoprune.report.pareto import trials_frame
from autoprune.study.runs import open_run
from conftest import RANGE_STUDY

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # Chromium's start and the dashboard's: the slow tier
ARTIFACTS = Path(__file__).parent / "artifacts"
ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 120  # the longest a page may take to draw on a loaded 2-core machine


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless Chromium for the browser tests: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=options)
    ARTIFACTS.mkdir(exist_ok=True)
    yield session
    session.quit()


def _wait_for(session, script: str, done) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(session, WAIT_S).until(lambda s: done(s.execute_script(script)))
    return session.execute_script(script)


def _errors(session) -> list[str]:
    return [entry["message"] for entry in session.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_html_report_draws_every_trial_from_the_file_system(browser, tiny_range_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--study", RANGE_STUDY, "--run-dir", str(tiny_range_run), "--out", str(out)]) == 0
    frame = trials_frame(open_run(RANGE_STUDY, run_dir=tiny_range_run))
    browser.get((out / "report.html").as_uri())  # file://: no server
    # Every trial once (front or not), the uniform reference again on its curve, and the base model.
    expected = len(frame) + int(frame["uniform"].sum()) + 1
    count = "return document.querySelectorAll('#front path.point').length"
    assert _wait_for(browser, count, lambda n: n >= expected) == expected
    front = ("return Array.from(document.querySelectorAll('#front g.trace')).find("
             "t => t.querySelector('path.point') && t.__data__ && t.__data__[0].trace.name.startsWith('Pareto'))"
             ".querySelectorAll('path.point').length")
    assert browser.execute_script(front) == int(frame["on_front"].sum())
    bars = "return document.querySelectorAll('#channels path').length + document.querySelectorAll('#sensitivity path.point').length"
    assert browser.execute_script(bars) > 0
    browser.save_screenshot(str(ARTIFACTS / "report.png"))
    assert _errors(browser) == []


def _start_dashboard(run_dir: Path) -> tuple[subprocess.Popen, list[str]]:
    """``autoprune dashboard --port 0`` in a subprocess; the URLs it prints once it listens."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # As from a terminal: a shell without job control starts background jobs with SIGINT ignored, and
    # the child would inherit that, so Ctrl-C (SIGINT below) could not stop it when the suite runs as one.
    process = subprocess.Popen([sys.executable, "-m", "autoprune", "dashboard", "--study", RANGE_STUDY,
                                "--run-dir", str(run_dir), "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ready, _, _ = select.select([process.stdout], [], [], WAIT_S)  # the line comes once the port answers
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        pytest.fail(f"autoprune dashboard printed no URL: {process.communicate()[1][-2000:]}")
    return process, re.findall(r"http://\S+", line)


def test_the_dashboard_shows_the_search_and_its_front(browser, tiny_range_run, tmp_path):
    run_dir = shutil.copytree(tiny_range_run, tmp_path / "run")  # the dashboard writes the front copy
    process, urls = _start_dashboard(run_dir)
    try:
        search, front = urls
        assert search.startswith("http://127.0.0.1:")  # localhost, where Optuna users expect it
        complete = len(open_run(RANGE_STUDY, run_dir=run_dir).complete())
        browser.get(front)
        points = "return document.querySelectorAll('#graph-pareto-front path.point').length"
        assert _wait_for(browser, points, lambda n: n >= complete) == complete  # every trial of the copy
        assert f"{RANGE_STUDY}-front" in browser.find_element("tag name", "body").text
        browser.save_screenshot(str(ARTIFACTS / "dashboard-front.png"))
        browser.get(search)
        history = "return document.querySelectorAll('#plot-history path.point').length"
        assert _wait_for(browser, history, lambda n: n >= complete) >= complete
        assert RANGE_STUDY in browser.find_element("tag name", "body").text
        browser.save_screenshot(str(ARTIFACTS / "dashboard-search.png"))
        assert _errors(browser) == []
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            out, err = process.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()  # never outlive the test
            raise
    assert process.returncode == 0 and "dashboard stopped" in out and "Traceback" not in err
