"""jobs.finalize_attempts and finalize_not_before

A job whose assembly fails is retried with a backoff, then ends failed, instead of being
claimed again at once by every finalizer.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('finalize_attempts', sa.Integer(), server_default='0', nullable=False))
    op.add_column('jobs', sa.Column('finalize_not_before', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'finalize_not_before')
    op.drop_column('jobs', 'finalize_attempts')
