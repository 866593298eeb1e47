"""optuna-dashboard's own study API, through its WSGI app (what `optuna-dashboard URL` serves)."""

from __future__ import annotations

import io
import json


def dashboard_study(storage: str, name: str) -> dict:
    """optuna-dashboard's study detail (GET /api/studies/<id>) of study ``name``."""
    from optuna_dashboard import wsgi

    app = wsgi(storage)

    def get(path: str) -> dict:
        status = []
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO()}
        body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
        assert status[0].startswith("200"), (path, status, body[:500])
        return json.loads(body)

    ids = {s["study_name"]: s["study_id"] for s in get("/api/studies")["study_summaries"]}
    return get(f"/api/studies/{ids[name]}")
