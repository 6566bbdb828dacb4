"""files.sha256: an uploaded file's digest, so a resubmitted upload is recognised as the same job

A job from a file (input_file_id) is fingerprinted by the file's content: an Idempotency-Key
retried with the same file uploaded again returns the job it created. Files uploaded before
this have none and are fingerprinted by their id.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('files', sa.Column('sha256', sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column('files', 'sha256')
