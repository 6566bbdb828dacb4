"""ix_requests_result_key on (result_key, job_id): a file job, written a batch at a time, finds
which of a batch's cache hits an earlier batch of the same job already counted in its cached
spend by a direct index probe per key (the entry's other jobs are not visited). Eviction's
lookups by result_key alone use its leading column as before.

Revision ID: 0022
Revises: 0021
"""

import sqlalchemy as sa
from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_requests_result_key', table_name='requests')
    op.create_index('ix_requests_result_key', 'requests', ['result_key', 'job_id'],
                    postgresql_where=sa.text('result_key IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_requests_result_key', table_name='requests')
    op.create_index('ix_requests_result_key', 'requests', ['result_key'],
                    postgresql_where=sa.text('result_key IS NOT NULL'))
