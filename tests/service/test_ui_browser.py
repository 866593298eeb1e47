"""The dashboard in a real headless Chromium (Debian's, driven by Playwright for Python)."""

from __future__ import annotations

import pytest

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def test_signin_and_the_jobs_list_in_chromium(browser, stack, tiny_spec):
    from service.db import jobs as job_db
    from service.db import session_scope
    from service.status import JobStatus

    with stack.client() as api:
        job = api.post("/v1/jobs", json=tiny_spec).json()
    with session_scope(stack.settings.database()) as s:  # the workers' own code path
        job_db.set_status(s, job["id"], JobStatus.RUNNING)
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{stack.url}/")
    assert page.url.startswith(f"{stack.url}/ui/signin")
    page.fill("#token", "hmaopt_wrong")
    page.click("button[type=submit]")
    assert page.locator(".error").inner_text() == "Unknown or revoked token."
    page.fill("#token", stack.tokens["viewer"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.url}/ui/jobs")
    row = page.locator(f"tr[data-job='{job['id']}']")
    assert row.locator(".status").inner_text() == "running"
    assert "test-viewer · viewer" in page.locator("header .who").inner_text()
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["hmaopt_session"]["httpOnly"] and cookies["hmaopt_session"]["sameSite"] == "Strict"
    # every request the page made went to this server on 127.0.0.1
    assert requests and all(u.startswith(stack.url) for u in requests), requests
    page.click("header .signout button")
    page.wait_for_url(f"{stack.url}/ui/signin")
    page.close()
