"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 10:07:24.536006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Fencing tokens for task leases (Alembic does not autogenerate sequences).
    op.execute(sa.schema.CreateSequence(sa.Sequence("lease_token_seq")))
    op.create_table('jobs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('teacher', sa.String(length=200), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('top_logprobs', sa.Integer(), nullable=False),
    sa.Column('sampling', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('cache_policy', sa.String(length=16), nullable=False),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('body_sha256', sa.String(length=64), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancel_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_jobs_idempotency_key'))
    )
    op.create_index(op.f('ix_jobs_created_at'), 'jobs', ['created_at'], unique=False)
    op.create_index(op.f('ix_jobs_status'), 'jobs', ['status'], unique=False)
    op.create_table('tasks',
    sa.Column('key', sa.String(length=80), nullable=False),
    sa.Column('teacher', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('prompt_token_ids', postgresql.ARRAY(sa.Integer()), nullable=False),
    sa.Column('response_token_ids', postgresql.ARRAY(sa.Integer()), nullable=True),
    sa.Column('sampling', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('top_logprobs', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('max_attempts', sa.Integer(), server_default='3', nullable=False),
    sa.Column('errors', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('suspect', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_token', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_tasks'))
    )
    op.create_index('ix_tasks_claimable', 'tasks', ['teacher', 'state', 'created_at'], unique=False)
    op.create_index('ix_tasks_lease_expiry', 'tasks', ['lease_expires_at'], unique=False, postgresql_where=sa.text("state = 'leased'"))
    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('teacher', sa.String(length=200), nullable=False),
    sa.Column('hostname', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('stats', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_index(op.f('ix_workers_teacher'), 'workers', ['teacher'], unique=False)
    op.create_table('requests',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('request_index', sa.Integer(), nullable=False),
    sa.Column('custom_id', sa.String(length=512), nullable=False),
    sa.Column('cache_key', sa.String(length=80), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('cached', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('result_key', sa.String(length=80), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_requests_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_requests')),
    sa.UniqueConstraint('job_id', 'request_index', name=op.f('uq_requests_job_id_request_index'))
    )
    op.create_index('ix_requests_job_id_state', 'requests', ['job_id', 'state'], unique=False)
    op.create_index('ix_requests_pending_key', 'requests', ['cache_key'], unique=False, postgresql_where=sa.text("state = 'pending'"))
    op.create_table('shards',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('shard_index', sa.Integer(), nullable=True),
    sa.Column('path', sa.String(length=500), nullable=False),
    sa.Column('rows', sa.Integer(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_shards_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_shards')),
    sa.UniqueConstraint('job_id', 'shard_index', name=op.f('uq_shards_job_id_shard_index'))
    )
    op.create_table('results',
    sa.Column('cache_key', sa.String(length=80), nullable=False),
    sa.Column('teacher', sa.String(length=200), nullable=False),
    sa.Column('shard_id', sa.String(length=40), nullable=False),
    sa.Column('row_start', sa.Integer(), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], name=op.f('fk_results_shard_id_shards')),
    sa.PrimaryKeyConstraint('cache_key', name=op.f('pk_results'))
    )
    op.create_index(op.f('ix_results_shard_id'), 'results', ['shard_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_results_shard_id'), table_name='results')
    op.drop_table('results')
    op.drop_table('shards')
    op.drop_index('ix_requests_pending_key', table_name='requests', postgresql_where=sa.text("state = 'pending'"))
    op.drop_index('ix_requests_job_id_state', table_name='requests')
    op.drop_table('requests')
    op.drop_index(op.f('ix_workers_teacher'), table_name='workers')
    op.drop_table('workers')
    op.drop_index('ix_tasks_lease_expiry', table_name='tasks', postgresql_where=sa.text("state = 'leased'"))
    op.drop_index('ix_tasks_claimable', table_name='tasks')
    op.drop_table('tasks')
    op.drop_index(op.f('ix_jobs_status'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_created_at'), table_name='jobs')
    op.drop_table('jobs')
    op.execute(sa.schema.DropSequence(sa.Sequence("lease_token_seq")))
