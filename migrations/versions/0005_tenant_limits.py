"""tenants.limits and jobs.spend_tokens

tenants.limits: a tenant's own values of the submission limits; jobs.spend_tokens: a
finished job's spend, fixed when it ends.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('tenants', sa.Column('limits', postgresql.JSONB(astext_type=sa.Text()),
                                       server_default=sa.text("'{}'::jsonb"), nullable=False))
    op.add_column('jobs', sa.Column('spend_tokens', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'spend_tokens')
    op.drop_column('tenants', 'limits')
