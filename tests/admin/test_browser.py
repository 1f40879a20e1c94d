"""The admin in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by selenium) logs in through the real login form of the real web process.

Screenshots go to ``test-artifacts/`` (gitignored) and, when ``SAVE_SCREENSHOTS_TO`` is set,
to that folder too (``docs/screenshots/`` was produced that way).
"""

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.conf import settings

from tests.e2e.harness import ROOT, Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when missing; skip when that is impossible."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium/chromedriver missing and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(argv)} failed): {result.stderr[-500:]}")


@pytest.fixture
def web(tmp_path):
    database = settings.DATABASES["default"]
    if not database["ENGINE"].endswith("postgresql"):
        pytest.skip("browser tests run on the PostgreSQL lane")
    fleet = Fleet(admin_url=database, workdir=tmp_path)
    (tmp_path / "var").mkdir()
    fleet.create_database()
    try:
        yield fleet
    except BaseException:  # pragma: no cover - diagnostics only
        print(fleet.logs())
        raise
    finally:
        fleet.close()


@pytest.fixture
def browser():
    ensure_chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in requirements-dev.txt")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-admin-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def save(driver, name: str) -> Path:
    targets = [ROOT / "test-artifacts"]
    if os.environ.get("SAVE_SCREENSHOTS_TO"):
        targets.append(Path(os.environ["SAVE_SCREENSHOTS_TO"]))
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(folder / name)), f"screenshot {name} not written"
    return targets[0] / name


def test_a_superuser_logs_in_and_sees_the_dashboard_and_the_nodes(web, browser):
    from selenium.webdriver.common.by import By

    password = secrets.token_urlsafe(18)
    web.settings_env["DJANGO_SUPERUSER_PASSWORD"] = password
    web.manage("createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.invalid")
    web.manage("shell", "-c", "from tests.admin.demo import build; build()")
    web.start_web(workers=1)

    browser.get(f"{web.base_url}/admin/login/?next=/admin/fleet/")
    browser.find_element(By.ID, "id_username").send_keys("admin")
    browser.find_element(By.ID, "id_password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()

    # The screenshots are of the content: fold the admin's navigation sidebar (kept in localStorage).
    browser.execute_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
    browser.refresh()
    dashboard = browser.find_element(By.ID, "fleet-dashboard")
    text = dashboard.text
    assert "llama-3-8b" in text and "whisper-large" in text
    assert "loaded x2 (1 in flight)" in text
    assert "gpu-a100-01" in text and "gpu-l4-01" in text
    assert browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]').get_attribute("content") == "10"
    # The charts are drawn (inline SVG, laid out by the browser with a real size) and branded.
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) == 5, len(charts)  # pass durations, actions, cold loads, one per model
    assert all(chart.size["width"] > 100 and chart.size["height"] > 30 for chart in charts)
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.chart-bar")) >= 2 * 120
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart circle.load-failed")
    assert browser.title == "Fleet dashboard | Control plane"
    assert browser.find_element(By.CSS_SELECTOR, 'link[rel="icon"]').get_attribute("href").endswith("favicon.svg")
    browser.set_window_size(1400, 2100)  # the whole dashboard in one picture
    save(browser, "dashboard.png")
    browser.set_window_size(1400, 900)

    browser.get(f"{web.base_url}/admin/reconciler/reconcilepass/")
    timeline = browser.find_element(By.ID, "pass-timeline")
    assert len(timeline.find_elements(By.CSS_SELECTOR, "rect.outcome-error")) == 2  # duration and actions
    save(browser, "passes.png")

    browser.get(f"{web.base_url}/admin/registry/node/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 5
    listing = browser.find_element(By.ID, "result_list").text
    assert "draining" in listing
    assert "not placed on\ndoes not answer the worker gRPC service" in listing
    assert "fleet registration token (LocalAI worker)" in listing and "900.0 GiB / 2.0 TiB" in listing
    save(browser, "nodes.png")

    # A logged-out browser is sent to the login form.
    browser.delete_all_cookies()
    browser.get(f"{web.base_url}/admin/fleet/")
    assert "/admin/login/" in browser.current_url
