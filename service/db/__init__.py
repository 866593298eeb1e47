"""The service's data layer: models, sessions, migrations and queries."""

from service.db.models import Base, Job, Token, Trial, Worker
from service.db.session import get_engine, safe_url, session_scope

__all__ = ["Base", "Job", "Token", "Trial", "Worker", "get_engine", "safe_url", "session_scope"]
