"""ix_requests_job_id_state becomes ix_requests_job_id_unsettled, on the requests that are not
`done`: the lookups by job and state (cancel: pending; the error pages: failed or cancelled; the
online wait: pending) never ask for `done`, and `done` is where nearly every request ends up. A
cached request is written `done` and a computed one becomes `done`; neither now adds an entry
to this index, which a 10^6-request cached job paid 10^6 times.

Built in the migration's transaction: CREATE INDEX CONCURRENTLY waits for every open
transaction, including those of other migrators waiting for the migration lock, and so
deadlocks with them. On a live table of 10^7 requests, build it first by hand, without blocking
writes, and this migration then only drops the old index:

    CREATE INDEX CONCURRENTLY ix_requests_job_id_unsettled ON requests (job_id, state)
     WHERE state <> 'done';

Revision ID: 0023
Revises: 0022
"""

import sqlalchemy as sa
from alembic import op

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_requests_job_id_unsettled', 'requests', ['job_id', 'state'],
                    postgresql_where=sa.text("state <> 'done'"), if_not_exists=True)
    op.drop_index('ix_requests_job_id_state', table_name='requests', if_exists=True)


def downgrade() -> None:
    op.create_index('ix_requests_job_id_state', 'requests', ['job_id', 'state'], if_not_exists=True)
    op.drop_index('ix_requests_job_id_unsettled', table_name='requests', if_exists=True)
