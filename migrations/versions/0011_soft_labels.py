"""Jobs record how their shards deliver the soft labels (jobs.soft_labels)

NULL for the jobs that exist (they were assembled as float32); a nullable column without a
default is a metadata-only change.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('soft_labels', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'soft_labels')
