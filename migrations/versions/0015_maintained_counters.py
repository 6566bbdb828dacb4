"""Maintained counters: job counts and spend, task waiters and idle tasks, claim turns, worker pruning

Jobs carry their request counts and token spend, kept by the statements that change request
states (in the same transaction), so a status poll reads one row. Tasks carry `waiters`, the
number of pending requests waiting on them; a task nobody waits for is `idle`, never claimed
or visited by a claim, until a new submission waits on it again. Tasks carry a `turn` (the
claim's round-robin order by job). Workers gone for a while are pruned into engine_totals.
Backfilled from a recount.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

COUNTERS = ('n_pending', 'n_completed', 'n_cached', 'n_failed', 'n_cancelled')
SPEND = ('sent_prompt_tokens', 'sent_completion_tokens', 'cached_prompt_tokens', 'cached_completion_tokens')


def upgrade() -> None:
    for name in COUNTERS:
        op.add_column('jobs', sa.Column(name, sa.Integer(), server_default='0', nullable=False))
    for name in SPEND:
        op.add_column('jobs', sa.Column(name, sa.BigInteger(), server_default='0', nullable=False))
    op.add_column('jobs', sa.Column('ready_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET ready_at = now() WHERE status = 'finalizing'")
    op.add_column('tasks', sa.Column('waiters', sa.Integer(), server_default='0', nullable=False))
    op.add_column('tasks', sa.Column('turn', sa.BigInteger(), server_default='0', nullable=False))
    op.execute(
        """
        UPDATE jobs j SET n_pending = c.pending, n_completed = c.completed, n_cached = c.cached,
               n_failed = c.failed, n_cancelled = c.cancelled
          FROM (SELECT job_id,
                       count(*) FILTER (WHERE state = 'pending') AS pending,
                       count(*) FILTER (WHERE state = 'done' AND NOT cached) AS completed,
                       count(*) FILTER (WHERE state = 'done' AND cached) AS cached,
                       count(*) FILTER (WHERE state = 'failed') AS failed,
                       count(*) FILTER (WHERE state = 'cancelled') AS cancelled
                  FROM requests GROUP BY job_id) c
         WHERE c.job_id = j.id
        """
    )
    op.execute(
        """
        UPDATE jobs j SET sent_prompt_tokens = s.sp, sent_completion_tokens = s.sc,
               cached_prompt_tokens = s.cp, cached_completion_tokens = s.cc
          FROM (SELECT a.job_id,
                       COALESCE(sum(res.prompt_tokens) FILTER (WHERE NOT a.cached), 0) AS sp,
                       COALESCE(sum(res.completion_tokens) FILTER (WHERE NOT a.cached), 0) AS sc,
                       COALESCE(sum(res.prompt_tokens) FILTER (WHERE a.cached), 0) AS cp,
                       COALESCE(sum(res.completion_tokens) FILTER (WHERE a.cached), 0) AS cc
                  FROM (SELECT DISTINCT job_id, result_key, cached FROM requests
                         WHERE state = 'done' AND result_key IS NOT NULL) a
                  JOIN results res ON res.cache_key = a.result_key
                 GROUP BY a.job_id) s
         WHERE s.job_id = j.id
        """
    )
    op.execute(
        """
        UPDATE tasks t SET waiters = w.n
          FROM (SELECT cache_key, count(*) AS n FROM requests WHERE state = 'pending' GROUP BY cache_key) w
         WHERE w.cache_key = t.key
        """
    )
    op.execute("UPDATE tasks SET state = 'idle' WHERE state = 'pending' AND waiters = 0")
    # Tasks already queued keep their order (oldest first) as their turns.
    op.execute(
        """
        UPDATE tasks t SET turn = o.turn
          FROM (SELECT key, row_number() OVER (PARTITION BY teacher ORDER BY created_at, key) AS turn
                  FROM tasks WHERE state IN ('pending', 'leased')) o
         WHERE o.key = t.key
        """
    )
    op.drop_index('ix_tasks_claimable', table_name='tasks')
    op.create_index('ix_tasks_claim', 'tasks', ['teacher', 'turn', 'key'],
                    postgresql_where=sa.text("state = 'pending' AND NOT suspect"))
    op.drop_column('jobs', 'spend_tokens')
    op.create_index('ix_workers_heartbeat_at', 'workers', ['heartbeat_at'])
    op.create_table('engine_totals',
                    sa.Column('teacher', sa.String(length=200), nullable=False),
                    sa.Column('stats', sa.dialects.postgresql.JSONB(astext_type=sa.Text()),
                              server_default=sa.text("'{}'::jsonb"), nullable=False),
                    sa.PrimaryKeyConstraint('teacher', name=op.f('pk_engine_totals')))
    # The tenant's pending work (its limit) sums the counters of its unfinished jobs only.
    op.create_index('ix_jobs_tenant_active', 'jobs', ['tenant'],
                    postgresql_where=sa.text("status IN ('queued', 'running')"))


def downgrade() -> None:
    op.drop_index('ix_jobs_tenant_active', table_name='jobs')
    op.drop_table('engine_totals')
    op.drop_index('ix_workers_heartbeat_at', table_name='workers')
    op.drop_index('ix_tasks_claim', table_name='tasks')
    op.create_index('ix_tasks_claimable', 'tasks', ['teacher', 'state', 'created_at'])
    op.add_column('jobs', sa.Column('spend_tokens', sa.dialects.postgresql.JSONB(), nullable=True))
    op.execute("UPDATE tasks SET state = 'pending' WHERE state = 'idle'")
    op.drop_column('tasks', 'waiters')
    op.drop_column('tasks', 'turn')
    for name in COUNTERS + SPEND:
        op.drop_column('jobs', name)
    op.drop_column('jobs', 'ready_at')
