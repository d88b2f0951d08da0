"""Alembic environment: runs on the connection handed over by ``pe_node.migrations.upgrade``."""

from alembic import context

from pe_node.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
