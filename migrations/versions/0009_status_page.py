"""Status page: job_progress snapshots and the jobs-by-status index

job_progress holds a job's counts every few seconds while it runs (the job page's chart reads
them, never the requests); ix_jobs_tenant_status_created_at pages a tenant's jobs filtered by status.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_progress',
        sa.Column('job_id', sa.String(40), sa.ForeignKey('jobs.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('at', sa.DateTime(timezone=True), primary_key=True, server_default=sa.text('now()')),
        sa.Column('completed', sa.Integer, nullable=False),
        sa.Column('cached', sa.Integer, nullable=False),
        sa.Column('failed', sa.Integer, nullable=False),
    )
    op.create_index('ix_jobs_tenant_status_created_at', 'jobs', ['tenant', 'status', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_jobs_tenant_status_created_at', table_name='jobs')
    op.drop_table('job_progress')
