"""Job totals: what ended jobs counted, kept by a trigger, so /metrics never sums every job

A job's counters move into `job_totals` (per teacher, mode and final status) when it ends: the
trigger adds an ended job's counters, and when an ended job's row changes again (counters can
still move, a status can change between final ones) it takes back what the old row added first.
A job leaving the final states (deleted: `deleting`, or its row removed) keeps what it added, so
the totals never go down. Backfilled from the ended jobs present.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

FINISHED = "('succeeded', 'failed', 'cancelled')"
COUNTED = ('n_completed', 'n_cached', 'n_failed', 'n_cancelled', 'sent_prompt_tokens', 'sent_completion_tokens',
           'cached_prompt_tokens', 'cached_completion_tokens')


def upgrade() -> None:
    op.create_table(
        'job_totals',
        sa.Column('teacher', sa.String(length=200), nullable=False),
        sa.Column('mode', sa.String(length=16), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('jobs', sa.BigInteger(), server_default='0', nullable=False),
        *[sa.Column(name, sa.BigInteger(), server_default='0', nullable=False) for name in COUNTED],
        sa.PrimaryKeyConstraint('teacher', 'mode', 'status', name=op.f('pk_job_totals')),
    )
    columns = ", ".join(COUNTED)
    op.execute(
        f"""
        INSERT INTO job_totals (teacher, mode, status, jobs, {columns})
        SELECT teacher, mode, status, count(*), {", ".join(f"sum({c})" for c in COUNTED)}
          FROM jobs WHERE status IN {FINISHED} GROUP BY teacher, mode, status
        """
    )
    take_back = ", ".join(f"{c} = {c} - OLD.{c}" for c in COUNTED)
    add = ", ".join(f"{c} = t.{c} + excluded.{c}" for c in COUNTED)
    op.execute(
        f"""
        CREATE FUNCTION job_totals_count() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' AND OLD.status IN {FINISHED} THEN
                UPDATE job_totals SET jobs = jobs - 1, {take_back}
                 WHERE teacher = OLD.teacher AND mode = OLD.mode AND status = OLD.status;
            END IF;
            INSERT INTO job_totals AS t (teacher, mode, status, jobs, {columns})
            VALUES (NEW.teacher, NEW.mode, NEW.status, 1, {", ".join(f"NEW.{c}" for c in COUNTED)})
            ON CONFLICT (teacher, mode, status) DO UPDATE SET jobs = t.jobs + 1, {add};
            RETURN NULL;
        END
        $$
        """
    )
    # Only rows that are (still) ended fire it: a running job's counter updates cost nothing here.
    op.execute(
        f"""
        CREATE TRIGGER jobs_count_ended AFTER INSERT OR UPDATE ON jobs FOR EACH ROW
          WHEN (NEW.status IN {FINISHED}) EXECUTE FUNCTION job_totals_count()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_count_ended ON jobs")
    op.execute("DROP FUNCTION job_totals_count()")
    op.drop_table('job_totals')
