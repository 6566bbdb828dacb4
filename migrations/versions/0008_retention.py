"""Retention: results.last_used_at and the sweep's indexes

results.last_used_at (least-recently-used eviction of cache entries) and the indexes the bounded retention sweep reads: finished jobs by age, entries by last use, and the
requests that point at an entry (an entry an unfinished job reads is never evicted)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # now() is stable, so this is a metadata-only change on PostgreSQL 11+: existing entries count
    # as used at upgrade time (no whole-table rewrite).
    op.add_column('results', sa.Column('last_used_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                                       nullable=False))
    op.create_index('ix_results_last_used_at', 'results', ['last_used_at'])
    op.create_index('ix_jobs_finished_at', 'jobs', ['finished_at'],
                    postgresql_where=sa.text('finished_at IS NOT NULL'))
    op.create_index('ix_requests_result_key', 'requests', ['result_key'],
                    postgresql_where=sa.text('result_key IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_requests_result_key', table_name='requests')
    op.drop_index('ix_jobs_finished_at', table_name='jobs')
    op.drop_index('ix_results_last_used_at', table_name='results')
    op.drop_column('results', 'last_used_at')
