"""Per-request parameters; batch usage, model and file expiry; files deletable

requests.parameters: a request's own sampling parameters and top_logprobs, where they differ from
its job's (NULL when they do not), so a job's shards can record them per row. batches.model,
batches.usage and batches.output_expires_after_s, files.expires_at: what OpenAI's objects carry.
batches.input_file_id loses its foreign key: an input file can be deleted (as OpenAI allows) while
its batches keep its id. files gets indexes for listing a tenant's files and for the retention
sweep of expired ones.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # All nullable (or with constant defaults): metadata-only changes, no table rewrite.
    op.add_column('requests', sa.Column('parameters', JSONB(), nullable=True))
    op.add_column('batches', sa.Column('model', sa.String(length=200), nullable=True))
    op.add_column('batches', sa.Column('usage', JSONB(), nullable=True))
    op.add_column('batches', sa.Column('output_expires_after_s', sa.Integer(), nullable=True))
    op.add_column('files', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.drop_constraint('fk_batches_input_file_id_files', 'batches', type_='foreignkey')
    op.create_index('ix_files_tenant_created_at', 'files', ['tenant', 'created_at'])
    op.create_index('ix_files_expires_at', 'files', ['expires_at'], postgresql_where=sa.text('expires_at IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_files_expires_at', table_name='files')
    op.drop_index('ix_files_tenant_created_at', table_name='files')
    op.create_foreign_key('fk_batches_input_file_id_files', 'batches', 'files', ['input_file_id'], ['id'])
    op.drop_column('files', 'expires_at')
    op.drop_column('batches', 'output_expires_after_s')
    op.drop_column('batches', 'usage')
    op.drop_column('batches', 'model')
    op.drop_column('requests', 'parameters')
