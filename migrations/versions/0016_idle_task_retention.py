"""Idle task retention: a partial index on idle tasks by age, for the retention sweep

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_tasks_idle', 'tasks', ['created_at'], postgresql_where=sa.text("state = 'idle'"))


def downgrade() -> None:
    op.drop_index('ix_tasks_idle', table_name='tasks')
