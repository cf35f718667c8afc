"""The playground at /ui, driven in a real headless browser (Debian's chromium and chromedriver).

The service runs the demo pool (real adapters, real answers). The page is checked as a person uses it:
- the pool is listed and drawn;
- a prompt streams three answers (routed, base, an adapter picked by hand) and the decision is drawn;
- an adapter is registered and deleted through the admin form;
- with admin disabled, the admin part says so;
- with Redis down, the degraded state is shown.

Set HILORA_SCREENSHOT=docs/img/playground.png to save the README's screenshot from this run.
Without chromium the module is skipped, unless HILORA_REQUIRE_BROWSER=1 (as in CI), which makes it fail.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_helpers import TOKEN, running_service

pytestmark = pytest.mark.slow  # Ray Serve

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo_pool"
PROMPT = "Spell out the number 42 using English words, please."  # phrased unlike the adapters' samples
WAIT_S = 120


def browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def paths():
    found = browser_paths()
    if found is None:
        message = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("HILORA_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def service(tmp_path_factory, paths):
    pytest.importorskip("ray")
    from ray import serve

    from deployments.app import build_app

    tmp = tmp_path_factory.mktemp("playground")
    config = {
        "model": {"torch_threads": 1, "engine": {"max_slots": 8, "host_cache_size": 16},
                  "loop": {"max_rows": 4, "max_waiting": 16}},
        "registry": {"seed_manifest": str(DEMO / "manifest.json")},
        "limits": {"max_tokens": 64},
    }
    # 4 logical CPUs: room for a second app, the same service with admin disabled, at /noadmin
    with running_service(tmp, config, num_cpus=4) as (url, redis_srv):
        no_admin = {**config, "admin_token_env": "HILORA_TEST_UNSET_TOKEN",
                    "registry": {**config["registry"], "store": {"redis_url": redis_srv.url}}}
        serve.run(build_app(no_admin), name="noadmin", route_prefix="/noadmin")
        yield {"url": url, "redis": redis_srv}


@pytest.fixture(scope="module")
def browser(paths):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach for the network
    chromium, driver = paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1250"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield drv
    drv.quit()


def wait_for(browser, predicate, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda d: predicate(d))
    except Exception:  # noqa: BLE001 - report what the page shows instead of a bare timeout
        shot = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "playground-failure.png"
        browser.save_screenshot(str(shot))
        body = browser.find_element("tag name", "body").text[:3000]
        pytest.fail(f"timed out waiting for {what}; page text:\n{body}\nscreenshot: {shot}")


# Read the page in one script call: the pool table is re-rendered every 5 s, so element handles go stale.
def text_of(browser, element_id: str) -> str:
    script = "const e = document.getElementById(arguments[0]); return e ? e.innerText.trim() : '';"
    return browser.execute_script(script, element_id)


def rows(browser) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll('#adapters tbody tr')].map(r => r.dataset.adapter);")


def test_pool_listed_prompt_streamed_and_decision_drawn(service, browser):
    browser.get(f"{service['url']}/ui")
    wait_for(browser, lambda d: len(rows(d)) == 12, "the 12 demo adapters in the pool table")
    table = text_of(browser, "adapters")
    assert "number_to_words" in table and "numbers" in table and "dates" in table  # ids and cluster tags
    assert len(browser.find_elements("css selector", "#map g[data-adapter]")) == 12
    assert text_of(browser, "health") == "ready"

    from selenium.webdriver.support.ui import Select

    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    Select(browser.find_element("id", "picked")).select_by_value("ordinal")
    browser.find_element("id", "run").click()
    wait_for(browser, lambda d: text_of(d, "meta-routed") and text_of(d, "meta-base") and text_of(d, "meta-picked"),
             "three answers to finish streaming")
    wait_for(browser, lambda d: d.find_elements("css selector", "#scores g.candidate"), "the candidate bars")

    # the routed answer on the page is the API's own answer to the same request
    api = httpx.post(f"{service['url']}/v1/chat/completions", timeout=120, json={
        "model": "hilora", "max_tokens": 32, "messages": [{"role": "user", "content": PROMPT}]}).json()
    assert text_of(browser, "out-routed") == api["choices"][0]["message"]["content"].strip()
    assert text_of(browser, "out-base") and text_of(browser, "out-picked")
    chosen = api["routing"]["adapters"]
    assert "number_to_words" in chosen  # routed to the task's adapter
    assert chosen and f"routed to {', '.join(chosen)}" in text_of(browser, "decision-summary")
    assert "routing" in text_of(browser, "decision-summary") and " ms" in text_of(browser, "decision-summary")
    bars = [g.get_attribute("data-adapter") for g in browser.find_elements("css selector", "#scores g.candidate")]
    assert bars == api["routing"]["candidates"]
    assert browser.find_elements("id", "threshold")  # the off-pool threshold line
    roc_rows = [r.get_attribute("data-adapter")
                for r in browser.find_elements("css selector", "#rocs tr[data-adapter]")]
    assert roc_rows == chosen
    assert browser.find_elements("id", "request-mark")  # the request placed on the pool map
    # residency follows the replica: the routed adapters are loaded now (the table refreshes every 5 s)
    wait_for(browser, lambda d: "device" in text_of(d, "adapters"), "an adapter shown as resident on the device")

    shot = os.environ.get("HILORA_SCREENSHOT")
    if shot:
        browser.save_screenshot(str(ROOT / shot))


def test_off_pool_prompt_shows_the_fallback(service, browser):
    browser.get(f"{service['url']}/ui")
    wait_for(browser, lambda d: len(rows(d)) == 12, "the pool table")
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("Who wrote Romeo and Juliet?")
    browser.find_element("id", "run").click()
    wait_for(browser, lambda d: "no adapter covers this request" in text_of(d, "decision-summary"),
             "the base-model fallback in the decision")
    assert not browser.find_elements("css selector", "#rocs tr[data-adapter]")


def test_admin_registers_and_deletes_an_adapter(service, browser):
    browser.get(f"{service['url']}/ui")
    wait_for(browser, lambda d: len(rows(d)) == 12, "the pool table")
    assert "enter the admin token" in text_of(browser, "admin-state")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("id", "token-check").click()
    wait_for(browser, lambda d: "admin enabled" in text_of(d, "admin-state"), "admin enabled")

    fields = {"reg-id": "list_max_copy", "reg-source": str(DEMO / "adapters" / "list_max"), "reg-tags": "lists, copy",
              "reg-samples": "Which number is the largest: 4, 9, 2?\nGive the biggest of 10, 3, 7."}
    for element_id, value in fields.items():
        box = browser.find_element("id", element_id)
        box.clear()
        box.send_keys(value)
    browser.find_element("id", "register").click()
    wait_for(browser, lambda d: "list_max_copy" in rows(d), "the new adapter in the pool table")
    assert "registered list_max_copy" in text_of(browser, "admin-result")
    assert "copy" in browser.execute_script(
        "return document.querySelector(\"tr[data-adapter='list_max_copy']\").innerText;")

    # the same id again: the API's own error, shown as it came
    browser.find_element("id", "register").click()
    wait_for(browser, lambda d: "HTTP 409" in text_of(d, "admin-result"), "the 409 conflict message")
    assert "already registered" in text_of(browser, "admin-result")

    browser.execute_script("document.querySelector(\"tr[data-adapter='list_max_copy'] button.delete\").click();")
    wait_for(browser, lambda d: "list_max_copy" not in rows(d), "the adapter gone from the table")


def test_admin_disabled_is_said(service, browser):
    browser.get(f"{service['url']}/noadmin/ui")  # the same page under a route prefix, admin disabled
    wait_for(browser, lambda d: "admin is disabled" in text_of(d, "admin-state"), "the admin-disabled message")
    assert "HILORA_TEST_UNSET_TOKEN" in text_of(browser, "admin-state")  # the API's message names the variable
    assert not browser.find_element("id", "register").is_enabled()
    wait_for(browser, lambda d: len(rows(d)) == 12, "the pool, still listed")


def test_redis_down_shows_degraded(service, browser):
    browser.get(f"{service['url']}/ui")
    wait_for(browser, lambda d: text_of(d, "health") == "ready", "ready")
    service["redis"].stop()
    try:
        wait_for(browser, lambda d: text_of(d, "health") == "degraded", "the degraded badge", timeout=60)
        banner = browser.find_element("id", "degraded")
        assert banner.is_displayed() and "last copy of the pool" in banner.text
        # routing still answers from the last copy, and the page still lists the pool
        assert len(rows(browser)) == 12
    finally:
        service["redis"].start()
        deadline = time.time() + 60
        while time.time() < deadline and httpx.get(f"{service['url']}/readyz").status_code != 200:
            time.sleep(1)


def test_a_large_pool_is_paged_searched_and_drawn_without_a_wall_of_labels(service, browser):
    """312 adapters (300 registered in one batch call): the table shows a page of 50 with a pager, search and a
    tag filter; the map draws every adapter with its name on hover, and labels only the routed candidates."""
    source = str(DEMO / "adapters" / "list_max")
    bulk = [{"id": f"bulk-{i:03d}", "source": source, "tags": [f"bulk{i % 3}"],
             "samples": [f"Give the largest of {i}, {i + 3} and {2 * i}.", f"Which is biggest: {i} or {i + 7}?"]}
            for i in range(300)]
    r = httpx.post(f"{service['url']}/admin/adapters/batch", json={"adapters": bulk},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
    assert r.status_code == 201, r.text[:500]
    browser.get(f"{service['url']}/ui")
    wait_for(browser, lambda d: "312 adapters" in text_of(d, "epoch"), "the 312-adapter pool")
    wait_for(browser, lambda d: text_of(d, "pool-page").startswith("1-50 of 312"), "the first page")
    assert len(rows(browser)) == 50
    assert len(browser.find_elements("css selector", "#map g[data-adapter]")) == 312
    assert not browser.find_elements("css selector", "#map text.label")  # no request yet: no labels
    first = rows(browser)
    browser.find_element("id", "pool-next").click()
    wait_for(browser, lambda d: text_of(d, "pool-page").startswith("51-100 of 312"), "the second page")
    assert not set(rows(browser)) & set(first)
    browser.find_element("id", "pool-search").send_keys("bulk-01")
    wait_for(browser, lambda d: text_of(d, "pool-page").startswith("1-10 of 10"), "the search's 10 matches")
    assert sorted(rows(browser)) == [f"bulk-01{i}" for i in range(10)]
    browser.find_element("id", "pool-search").clear()
    browser.execute_script("const s = document.getElementById('pool-tag'); s.value = 'bulk1';"
                           "s.dispatchEvent(new Event('change'));")
    browser.execute_script("const s = document.getElementById('pool-search'); s.value = '';"
                           "s.dispatchEvent(new Event('input'));")
    wait_for(browser, lambda d: text_of(d, "pool-page").startswith("1-50 of 100"), "the tag's 100 adapters")
    browser.find_element("id", "prompt").clear()
    browser.find_element("id", "prompt").send_keys(PROMPT)
    browser.find_element("id", "run").click()
    wait_for(browser, lambda d: d.find_elements("css selector", "#map text.label"), "the candidates' labels")
    labels = browser.execute_script("return [...document.querySelectorAll('#map text.label')].map(t => t.textContent);")
    assert 1 <= len(labels) <= 8
