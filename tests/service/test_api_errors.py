"""The API's error answers (service/api/errors.py) over a real uvicorn server, on SQLite and
on PostgreSQL: bounded list parameters, no SQL or stack in any body, a 500 that leaves the
keep-alive connection usable, ``field`` on 403 and 422, 400 for unparsable bodies, and a
405 whose ``Allow`` lists every method of the path."""

from __future__ import annotations

import httpx
import pytest

from service.api.deps import SessionDep

HUGE = "9223372036854775808"  # 2**63: past every database's integer
#: every list of the API (the parent need not exist: parameters are checked first)
LISTS = ["/v1/jobs", "/v1/jobs/{job}/trials", "/v1/pipelines", "/v1/pipelines/nightly/runs",
         "/v1/pipelines/nightly/promotions", "/v1/pipelines/nightly/deliveries"]
LEAKS = ("SELECT", "[SQL", "[parameters", "Traceback", "hmaopt_jobs", "sqlalche.me")


def _no_internals(body: str) -> None:
    for leak in LEAKS:
        assert leak not in body, (leak, body)


@pytest.mark.parametrize("path", LISTS)
def test_list_parameters_are_bounded(stack, path):
    with stack.client("viewer") as c:
        for param in ("offset", "limit"):
            r = c.get(path.format(job="0" * 32), params={param: HUGE})
            assert r.status_code == 422, (param, r.text)
            assert r.json()["error"] == "invalid_request" and r.json()["field"] == param
            _no_internals(r.text)
        r = c.get(path.format(job="0" * 32), params={"offset": "-1"})
        assert r.status_code == 422 and r.json()["field"] == "offset"
        # the largest offset is a page past the end, not an error
        r = c.get(path.format(job="0" * 32), params={"offset": str(2**31 - 1)})
        assert r.status_code in (200, 404), r.text
        if r.status_code == 200:
            assert r.json()["data"] == [] and r.json()["count"] == 0


def test_path_and_text_parameters_never_reach_the_database_unchecked(stack):
    with stack.client("viewer") as c:
        for path in ("/v1/jobs/a%00b", "/v1/pipelines/a%00b", "/v1/pipelines/a%00b/runs/x",
                     "/v1/jobs/a%00b/trials/1"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", (path, r.text)
        r = c.get(f"/v1/jobs/{'0' * 32}/trials/{HUGE}")
        assert r.status_code == 422 and r.json()["field"] == "number"
        for param in ("q", "name"):
            r = c.get("/v1/jobs", params={param: "a\x00b"})
            assert r.status_code == 422 and r.json()["field"] == param, r.text
    with stack.client() as c:
        r = c.post("/v1/pipelines", json={"name": "x", "job": {"name": "a\x00b"}})
        assert r.status_code == 422 and r.json()["field"] == "job.name", r.text


def _app_with_faults(stack):
    """A second app on the stack's settings, served by a real uvicorn, with routes that
    fail: an unexpected exception, a database fault carrying SQL, a missing table."""
    from sqlalchemy import text

    from service.api.app import create_app
    from service.embedded import ApiThread

    app = create_app(stack.settings, maintenance=False)

    @app.get("/test/boom")
    def boom():
        raise RuntimeError("secret internals: SELECT password FROM users")

    @app.get("/test/bad-sql")
    def bad_sql(session: SessionDep):
        if session.get_bind().dialect.name == "sqlite":  # the driver's own OverflowError
            session.execute(text("SELECT 'secret-literal', :p"), {"p": 2**70 + 12345678})
        else:  # a DataError, its SQL and parameters in its text
            session.execute(text("SELECT CAST('secret-literal' AS INTEGER) + :p"),
                            {"p": 12345678})

    @app.get("/test/no-table")
    def no_table(session: SessionDep):
        session.execute(text("SELECT secret_column FROM no_such_table_here"))

    return ApiThread(app)


def test_a_500_leaves_the_keep_alive_connection_working(stack):
    api = _app_with_faults(stack)
    url = api.start()
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            first = c.get("/healthz")
            port = first.extensions["network_stream"].get_extra_info("client_addr")[1]
            for path, status, code, hint in (
                    ("/test/boom", 500, "internal", "reference"),
                    ("/test/bad-sql", 500, "internal", "reference"),
                    ("/test/no-table", 503, "unavailable", "hmaopt db upgrade")):
                r = c.get(path)
                assert r.status_code == status, (path, r.text)
                assert r.json()["error"] == code and hint in r.json()["message"], r.text
                assert "secret" not in r.text and "12345678" not in r.text, r.text
                _no_internals(r.text)
                assert r.headers.get("connection") != "close"
                after = c.get("/healthz")  # the same connection, still open
                assert after.status_code == 200, path
                stream = after.extensions["network_stream"]
                assert stream.get_extra_info("client_addr")[1] == port, path
    finally:
        api.stop()


def test_forbidden_names_the_field(stack, tiny_spec, tmp_path):
    with stack.client("viewer") as c:
        r = c.post("/v1/jobs", json=tiny_spec)
        assert r.status_code == 403 and r.json()["field"] == "role", r.text
    with stack.client() as c:
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        r = c.post("/v1/jobs", json={**tiny_spec, "base_model": str(outside)})
        assert r.status_code in (403, 422) and r.json()["field"] == "base_model", r.text
        job = c.post("/v1/jobs", json=tiny_spec).json()
    browser = httpx.Client(base_url=stack.url, timeout=30)
    browser.post("/ui/signin", data={"token": stack.tokens["operator"]})
    r = browser.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 403 and r.json()["field"] == "X-CSRF-Token", r.text


@pytest.mark.parametrize("method, path", [("POST", "/v1/jobs"), ("POST", "/v1/pipelines"),
                                          ("PUT", "/v1/pipelines/nightly"),
                                          ("POST", "/v1/jobs/{job}/export")])
def test_unparsable_bodies_are_400(stack, method, path):
    with stack.client() as c:
        for raw in (b'{"name": ', b'\xff\xfe{"a": 1}'):
            r = c.request(method, path.format(job="0" * 32), content=raw,
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (raw, r.text)
            assert r.json()["error"] == "bad_request" and r.json()["field"] == "body"


def test_405_allows_every_method_of_the_path(stack):
    with stack.client() as c:
        r = c.delete("/v1/jobs")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
        assert r.json()["error"] == "method_not_allowed"
        r = c.patch("/v1/pipelines/nightly")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PUT"
        r = c.request("OPTIONS", "/v1/jobs/abc/cancel")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
