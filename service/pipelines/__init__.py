"""Nightly merge pipelines: pick up each new aligned checkpoint, search, promote if better.

- spec.py: the pipeline spec (template, schedule, checkpoint sources, promotion, webhooks);
- sources.py: the newest *complete* checkpoint of a folder; a pipeline checked against the
  roots before its first run;
- scheduler.py: the pass: due runs claimed once in the database, runs started as normal
  jobs and followed, stale steps failed;
- promotion.py: the promote-if-better decision, the export, the ``current`` alias and
  rollback;
- webhooks.py: Standard Webhooks signatures, deliveries retried with backoff.
"""
