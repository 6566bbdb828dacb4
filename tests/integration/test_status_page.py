"""The status page in a real browser (Playwright driving headless Chromium) against a live
stack: the API on a loopback port, its finalizer, and a worker on the scripted engine.

A user logs in with a key, watches a running job's bar advance to done, opens its shards and
its errors, and sees nothing of another tenant (that job's page answers 404). Screenshots go
to the test's folder (and to docs/ with TEACHERCACHE_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from service.settings import PROJECT_ROOT
from tests.integration.test_client_live import serve_on_loopback
from tests.jobs import create_api_key
from workers.scripted_engine import ScriptedEngine

FAIL_TOKEN = 31337
REQUESTS = 120


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"progress_every_s": 0.3, "shard_rows": 50})


@pytest.fixture
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine (`apt-get install chromium`; `make test` installs it where it can)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def live(rt, api_key):
    from service.http.app import create_app

    with serve_on_loopback(create_app(rt)) as url:
        yield url


def submit(url: str, key: str, requests: list[dict]) -> dict:
    answer = httpx.post(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                        json={"requests": requests, "top_logprobs": 2, "sampling": {"max_tokens": 8}})
    assert answer.status_code == 201, answer.text
    return answer.json()


def screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("TEACHERCACHE_UPDATE_SCREENSHOTS") == "1":
        page.screenshot(path=str(PROJECT_ROOT / "docs" / f"{name}.png"), full_page=True)


def percent(page) -> int:
    return int(re.match(r"(\d+)%", page.inner_text("#job-percent")).group(1))


def test_a_user_watches_a_job_to_done_sees_its_shards_and_errors_and_nothing_of_another_tenant(
        rt, api_key, live, browser, start_worker, tmp_path):
    other_key = create_api_key(rt, "beta")
    theirs = submit(live, other_key, [{"custom_id": "secret", "prompt_token_ids": [5, 6, 7]}])
    requests = [{"custom_id": f"q{i}", "prompt_token_ids": [1, 2, 1000 + i]} for i in range(REQUESTS)]
    requests[7] = {"custom_id": "doomed", "prompt_token_ids": [1, FAIL_TOKEN]}
    ours = submit(live, api_key, requests)
    # Slow enough that the page sees the job running for several refreshes.
    start_worker(ScriptedEngine(step_delay_s=0.05, tokens_per_step=1, fail_tokens=frozenset({FAIL_TOKEN})),
                 max_inflight=4)

    page = browser.new_page()
    page.goto(f"{live}/ui")
    assert page.url.endswith("/ui/login")  # no key yet: the login form
    page.fill("#key", "tc-not-a-key")
    page.click("#login")
    assert "not valid" in page.inner_text("#login-error")
    page.fill("#key", api_key)
    page.click("#login")
    page.wait_for_url(re.compile(r"/ui/jobs$"))
    assert page.inner_text("#tenant") == "alpha"
    listed = page.eval_on_selector_all("tr.job", "rows => rows.map(r => r.dataset.job)")
    assert ours["id"] in listed and theirs["id"] not in listed
    screenshot(page, tmp_path, "status-page-jobs")

    page.click(f"a[href='/ui/jobs/{ours['id']}']")
    page.wait_for_selector("#job-status")
    first = percent(page)
    assert first < 100 and page.inner_text("#job-status") in ("queued", "running")
    page.wait_for_function("() => parseInt(document.querySelector('#job-percent').innerText) > %d" % first,
                           timeout=60_000)  # the bar advances on its own (htmx refresh), no reload
    assert page.url.endswith(f"/ui/jobs/{ours['id']}")
    page.wait_for_function("() => document.querySelector('#job-status').innerText === 'succeeded'", timeout=120_000)
    assert percent(page) == 100
    page.reload()  # the shards and errors are listed once the job has ended
    assert page.is_visible("#chart")
    screenshot(page, tmp_path, "status-page-job")

    shard_links = page.eval_on_selector_all("#shards a", "links => links.map(a => a.href)")
    assert len(shard_links) == -(-REQUESTS // 50)
    download = page.request.get(shard_links[0])  # the browser's session cookie is the key
    assert download.status == 200 and download.body()[:4] == b"PAR1"
    errors = page.eval_on_selector_all("tr.request-error", "rows => rows.map(r => r.innerText)")
    assert len(errors) == 1 and "doomed" in errors[0] and "scripted failure" in errors[0]
    assert page.inner_text("#count-failed") == "1"

    page.goto(f"{live}/ui/workers")
    assert "smollm2-135m-instruct" in page.inner_text("#workers") and "alive" in page.inner_text("#workers")
    page.goto(f"{live}/ui/cache")
    assert int(page.inner_text("#cache-entries").replace(",", "")) >= REQUESTS - 1

    answer = page.goto(f"{live}/ui/jobs/{theirs['id']}")
    assert answer.status == 404 and theirs["id"] not in page.content().replace(f"no job {theirs['id']!r}", "")
    page.goto(f"{live}/ui/jobs?status=failed")
    assert page.is_visible("#no-jobs")

    page.click("button[type=submit]")  # log out: the cookie is gone and the pages ask for a key again
    page.goto(f"{live}/ui/jobs")
    assert page.url.endswith("/ui/login")
