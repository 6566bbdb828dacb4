"""Online jobs: jobs.interactive (the synchronous endpoints' jobs, answered from their result
shards, so the finalizer assembles no job shards for them), and the job's id as the payload of
`teachercache_jobs_ready`, so a waiting HTTP request is woken by its own jobs only
(service/online/wait.py); finalizers listen to every payload as before.

Revision ID: 0021
Revises: 0020
"""

import sqlalchemy as sa
from alembic import op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def ready_function(payload: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION jobs_notify_ready() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status THEN
                PERFORM pg_notify('teachercache_jobs_ready', {payload});
            END IF;
            RETURN NULL;
        END $$
        """


def upgrade() -> None:
    op.add_column('jobs', sa.Column('interactive', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.execute(ready_function("NEW.id"))


def downgrade() -> None:
    op.execute(ready_function("''"))
    op.drop_column('jobs', 'interactive')
