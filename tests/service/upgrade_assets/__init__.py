"""Databases saved at old revisions (make_assets.py builds them; test_migrations.py upgrades them)."""
