"""Alembic environment: runs on the connection ``accounts.store.migrate`` hands over (which
already holds the migration lock), inside its transaction."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
