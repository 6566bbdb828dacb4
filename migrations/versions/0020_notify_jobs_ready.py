"""Jobs ready: a job entering finalizing notifies the finalizers, which then stop polling for it

Every path that readies a job (the last request ending, a cancel, a submission answered whole
from the cache) moves its row to `finalizing`; this trigger sends `teachercache_jobs_ready` then
(delivered at commit, duplicates folded), so finalizers wait on the notification instead of
querying every half second (service/notify.py).

Revision ID: 0020
Revises: 0018
"""

from alembic import op

revision = '0020'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION jobs_notify_ready() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status THEN
                PERFORM pg_notify('teachercache_jobs_ready', '');
            END IF;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER jobs_notify_ready AFTER INSERT OR UPDATE OF status ON jobs
        FOR EACH ROW WHEN (NEW.status = 'finalizing') EXECUTE FUNCTION jobs_notify_ready()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_notify_ready ON jobs")
    op.execute("DROP FUNCTION jobs_notify_ready()")
