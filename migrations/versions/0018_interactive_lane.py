"""Interactive lane: tasks.interactive (requests of the synchronous OpenAI/vLLM endpoints) and a
partial index the claim walks for them ahead of batch work

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('tasks', sa.Column('interactive', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index('ix_tasks_claim_interactive', 'tasks', ['teacher', 'turn', 'key'],
                    postgresql_where=sa.text("state = 'pending' AND NOT suspect AND interactive"))


def downgrade() -> None:
    op.drop_index('ix_tasks_claim_interactive', table_name='tasks')
    op.drop_column('tasks', 'interactive')
