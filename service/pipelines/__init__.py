"""Nightly merge pipelines: pick up each new aligned checkpoint, search, promote if better.

- spec.py: the pipeline spec (template, schedule, checkpoint sources, promotion, webhooks);
- sources.py: the newest *complete* checkpoint of a folder;
- scheduler.py: due runs claimed once in the database, runs started as normal jobs, the
  promotion decision, the ``current`` alias and rollback;
- webhooks.py: Standard Webhooks signatures, deliveries retried with backoff.
"""
