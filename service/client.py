"""A thin client of the REST API: the ``hmaopt`` commands that talk to a server (``submit``,
``jobs``, ``pipeline``, ``demo``) use it.

HTTP errors become hmaopt errors, so the CLI exits with the same codes as in-process work
(service/errors.py, ``ExitCode``): 422 SpecError (2), 401 AuthenticationError and 403
PermissionDeniedError (5), 404 NotFoundError (3), 409 ConflictError (4), 503 or no answer
DependencyUnavailableError (6), any other error status HmaoptError (1). The error keeps the
server's ``error`` code and ``field``.

A job's events come over server-sent events, parsed by httpx-sse; a dropped stream is
resumed after the last event seen (``Last-Event-ID``) every ``RECONNECT_SECONDS``, and
waiting gives up after ``GIVE_UP_SECONDS`` without a working connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

from service.errors import (AuthenticationError, ConflictError, DependencyUnavailableError,
                            HmaoptError, NotFoundError, PermissionDeniedError, SpecError)
from service.status import TERMINAL, JobStatus

#: seconds between reconnections of a dropped event stream
RECONNECT_SECONDS = 1.0
#: seconds without a working connection after which waiting for a job gives up
GIVE_UP_SECONDS = 300.0


class Client:
    def __init__(self, server: str, token: str | None, timeout: float = 30.0) -> None:
        import httpx

        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise _error(response)
        try:
            return response.json()
        except ValueError as exc:
            raise HmaoptError(f"{self.server}{path} answered HTTP {response.status_code} "
                              "without JSON: is this an hmaopt server? (--server, "
                              "HMAOPT_SERVER_URL)") from exc

    def _unreachable(self, exc: Exception) -> DependencyUnavailableError:
        return DependencyUnavailableError(
            f"cannot reach the hmaopt server at {self.server}: {exc or type(exc).__name__}; is "
            "`hmaopt serve` running there? (--server, HMAOPT_SERVER_URL)")

    def dashboard_url(self, job_id: str) -> str:
        """The job's page on the dashboard (it asks a browser for an API token once)."""
        return f"{self.server}/ui/jobs/{job_id}"

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def jobs(self, *, status: list[str] | None = None, name: str | None = None,
             q: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        """One page of jobs, newest first: ``{"data": [...], "count": total}``."""
        params = {"status": status or [], "name": name, "q": q, "limit": limit,
                  "offset": offset}
        return self.request("GET", "/v1/jobs", params=_params(params))

    def trials(self, job_id: str, *, sort: str = "number", order: str = "asc",
               kind: str | None = None, feasible: bool | None = None, limit: int = 100,
               offset: int = 0) -> dict:
        """One page of a job's finished trials: ``{"data": [...], "count": total}``."""
        params = {"sort": sort, "order": order, "kind": kind, "limit": limit, "offset": offset,
                  "feasible": None if feasible is None else str(feasible).lower()}
        return self.request("GET", f"/v1/jobs/{job_id}/trials", params=_params(params))

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def export(self, job_id: str, out_dir: str | None = None, overwrite: bool = False) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/export",
                            json={"dir": out_dir, "overwrite": overwrite})

    # -- events ----------------------------------------------------------------------------

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) of a job until its final status, reconnecting with Last-Event-ID."""
        import httpx
        from httpx_sse import SSEError, connect_sse

        last, failing_since = None, None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events",
                                 headers=headers,
                                 timeout=httpx.Timeout(30.0, read=60.0)) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise _error(source.response)
                    failing_since = None
                    for sse in source.iter_sse():
                        last = sse.id or last
                        if not sse.data:  # a keep-alive comment after an event with an id
                            continue
                        data = sse.json()
                        yield sse.event, data
                        if sse.event in ("status", "job") and \
                                JobStatus(data["status"]) in TERMINAL:
                            return
            except (httpx.HTTPError, SSEError, json.JSONDecodeError) as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > GIVE_UP_SECONDS:
                    raise DependencyUnavailableError(
                        f"lost the hmaopt server at {self.server} for {GIVE_UP_SECONDS:.0f} s "
                        f"({exc}); the job {job_id} goes on: `hmaopt jobs show {job_id}`"
                    ) from exc
                time.sleep(RECONNECT_SECONDS)  # dropped: resume after the last event seen
                continue
            # the server ended the stream: the job is final (or was when we connected)
            if JobStatus(self.job(job_id)["status"]) in TERMINAL:
                return

    def wait(self, job_id: str, on_event: Callable[[str, dict], None] | None = None) -> dict:
        """Follow a job to its end; returns the final job."""
        for event, data in self.events(job_id):
            if on_event is not None:
                on_event(event, data)
        return self.job(job_id)


def _params(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None and v != []}


def _error(response) -> HmaoptError:
    try:
        body = response.json()
        message, field, code = body.get("message", response.text), body.get("field"), \
            body.get("error")
    except (ValueError, AttributeError):
        message, field, code = response.text, None, None
    status = response.status_code
    if status == 422:
        err = SpecError(message.removeprefix(f"{field}: ") if field else message, field=field)
    else:
        cls = {401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
               409: ConflictError, 503: DependencyUnavailableError}.get(status, HmaoptError)
        hint = "; give the CLI a token with --token or HMAOPT_TOKEN" if status == 401 else ""
        err = cls(f"{message} (HTTP {status}){hint}")
        if field is not None:
            err.field = field
    if code:
        err.code = code
    return err
