"""Alembic migrations of the service's tables (``hmaopt db upgrade``); see README.md here."""
