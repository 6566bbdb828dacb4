"""tasks: a partial index on suspect tasks

So a worker can ask cheaply whether one is waiting to run alone (the claim lane for suspects,
and the check that makes a busy worker drain for it).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_tasks_suspect', 'tasks', ['teacher', 'created_at'], unique=False,
                    postgresql_where=sa.text("suspect AND state IN ('pending', 'leased')"))


def downgrade() -> None:
    op.drop_index('ix_tasks_suspect', table_name='tasks',
                  postgresql_where=sa.text("suspect AND state IN ('pending', 'leased')"))
