"""The dashboard's sign-in, cookies, CSRF and jobs page, over real HTTP (httpx).

Browser tests (headless Chromium) come with the job and compare pages.
"""

from __future__ import annotations

import re

import httpx


def _signin(stack, role: str) -> httpx.Client:
    c = httpx.Client(base_url=stack.url, timeout=30)
    r = c.post("/ui/signin", data={"token": stack.tokens[role], "next": "/ui/jobs"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.text
    return c


def test_signin_cookies_and_the_jobs_page(stack, tiny_spec):
    with stack.client() as api:
        job = api.post("/v1/jobs", json=tiny_spec).json()
    anon = httpx.Client(base_url=stack.url, timeout=30)
    assert anon.get("/").headers["location"] == "/ui/jobs"
    r = anon.get("/ui/jobs")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin")
    wrong = anon.post("/ui/signin", data={"token": "hmaopt_wrong"})
    assert wrong.status_code == 401 and "Unknown or revoked token" in wrong.text
    assert "hmaopt_session" not in wrong.cookies

    r = anon.post("/ui/signin", data={"token": stack.tokens["viewer"], "next": "//evil.example"})
    assert r.headers["location"] == "/ui/jobs"  # no open redirect
    cookies = r.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("hmaopt_session="))
    csrf = next(c for c in cookies if c.startswith("hmaopt_csrf="))
    assert "HttpOnly" in session and "SameSite=strict" in session
    assert "HttpOnly" not in csrf and "SameSite=strict" in csrf

    page = anon.get("/ui/jobs")
    assert page.status_code == 200
    assert tiny_spec["name"] in page.text and job["id"] in page.text and "queued" in page.text
    assert "weight on the aligned model" in page.text
    assert anon.get("/ui/jobs", params={"status": "running"}).text.count(job["id"]) == 0
    assert job["id"] in anon.get("/ui/jobs", params={"q": tiny_spec["name"]}).text
    # every asset is local: no CDN
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page.text)
    assert anon.get("/ui/static/hmaopt.css").status_code == 200


def test_cookie_mutations_need_csrf_and_the_role(stack, tiny_spec):
    with stack.client() as api:
        job = api.post("/v1/jobs", json=tiny_spec).json()
    viewer = _signin(stack, "viewer")
    assert viewer.get(f"/v1/jobs/{job['id']}").status_code == 200  # reads by cookie
    token = viewer.cookies["hmaopt_csrf"]
    r = viewer.post(f"/v1/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": token})
    assert r.status_code == 403 and "operator role" in r.json()["message"]

    operator = _signin(stack, "operator")
    r = operator.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 403 and "CSRF" in r.json()["message"]
    r = operator.post(f"/v1/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403 and "CSRF" in r.json()["message"]
    r = operator.post(f"/v1/jobs/{job['id']}/cancel",
                      headers={"X-CSRF-Token": operator.cookies["hmaopt_csrf"]})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    # sign-out is a mutation too
    assert operator.post("/ui/signout", data={"csrf": "forged"}).status_code == 403
    out = operator.post("/ui/signout", data={"csrf": operator.cookies["hmaopt_csrf"]})
    assert out.status_code == 303 and out.headers["location"] == "/ui/signin"
    assert "hmaopt_session" not in operator.cookies
    assert operator.get("/ui/jobs").status_code == 303
