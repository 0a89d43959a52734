"""Alembic migrations of the accounts schema (run programmatically by ``accounts.store``)."""
