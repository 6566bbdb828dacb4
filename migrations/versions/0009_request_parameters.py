"""Per-request parameters: requests.parameters

A request's own sampling parameters and top_logprobs, where they differ from its job's (NULL
when they do not), so a job's shards can record them per row.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('requests', sa.Column('parameters', JSONB(), nullable=True))  # nullable: no table rewrite


def downgrade() -> None:
    op.drop_column('requests', 'parameters')
