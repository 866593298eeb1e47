"""A thin client of the REST API: ``hmaopt submit`` and ``hmaopt demo`` use it.

HTTP errors become hmaopt errors (so the CLI exits with the same codes as in-process work):
422 SpecError (2), 401 AuthenticationError / 403 PermissionDeniedError (5), 404 NotFoundError
(3), 409 ConflictError (4), 503 or no answer DependencyUnavailableError (6).
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

    def request(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DependencyUnavailableError(f"cannot reach the hmaopt server at {self.server}: "
                                             f"{exc}; is `hmaopt serve` running?") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) of a job until its final status, reconnecting with Last-Event-ID."""
        import httpx

        last, failing_since = None, None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(30.0, read=60.0)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    failing_since = None
                    for event, data, eid in _parse_sse(response.iter_lines()):
                        last = eid or last
                        yield event, data
                        if event in ("status", "job") and JobStatus(data["status"]) in TERMINAL:
                            return
            except httpx.HTTPError as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > GIVE_UP_SECONDS:
                    raise DependencyUnavailableError(
                        f"lost the hmaopt server at {self.server} for {GIVE_UP_SECONDS:.0f} s "
                        f"({exc}); the job {job_id} goes on: `GET /v1/jobs/{job_id}`") from exc
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


def _parse_sse(lines) -> Iterator[tuple[str, dict, str | None]]:
    event, data, eid = "message", [], None
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data)), eid
            event, data, eid = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                eid = value


def _error(response) -> HmaoptError:
    try:
        body = response.json()
        message, field = body.get("message", response.text), body.get("field")
    except ValueError:
        message, field = response.text, None
    status = response.status_code
    if status == 422:
        err = SpecError(message.removeprefix(f"{field}: ") if field else message, field=field)
        return err
    cls = {401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
           409: ConflictError, 503: DependencyUnavailableError}.get(status, HmaoptError)
    return cls(f"{message} (HTTP {status})")
