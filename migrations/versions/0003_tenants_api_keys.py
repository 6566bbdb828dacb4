"""Tenants and API keys; jobs, files and batches belong to a tenant

Rows written before tenants existed are given to the tenant `default`, created here only
when there are such rows; its owner gets a key with `teachercache keys create --tenant default`.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


OLD_ROWS_TENANT = "default"


def add_tenant_column(table: str) -> None:
    """Nullable first, backfilled, then NOT NULL: existing rows go to the `default` tenant."""
    op.add_column(table, sa.Column('tenant', sa.String(length=64), nullable=True))
    op.execute(sa.text(f"UPDATE {table} SET tenant = :tenant").bindparams(tenant=OLD_ROWS_TENANT))
    op.alter_column(table, 'tenant', nullable=False)


def upgrade() -> None:
    op.create_table('tenants',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('rate_tokens', sa.Float(), nullable=True),
    sa.Column('rate_updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_tenants'))
    )
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant'], ['tenants.name'], name=op.f('fk_api_keys_tenant_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys'))
    )
    op.create_index(op.f('ix_api_keys_tenant'), 'api_keys', ['tenant'], unique=False)
    op.execute(sa.text(
        "INSERT INTO tenants (name) SELECT :tenant WHERE EXISTS (SELECT 1 FROM jobs) OR EXISTS (SELECT 1 FROM files)"
    ).bindparams(tenant=OLD_ROWS_TENANT))
    add_tenant_column('batches')
    op.create_index('ix_batches_tenant_created_at', 'batches', ['tenant', 'created_at'], unique=False)
    op.create_foreign_key(op.f('fk_batches_tenant_tenants'), 'batches', 'tenants', ['tenant'], ['name'])
    add_tenant_column('files')
    op.create_index(op.f('ix_files_tenant'), 'files', ['tenant'], unique=False)
    op.create_foreign_key(op.f('fk_files_tenant_tenants'), 'files', 'tenants', ['tenant'], ['name'])
    add_tenant_column('jobs')
    op.drop_constraint(op.f('uq_jobs_idempotency_key'), 'jobs', type_='unique')
    op.create_index('ix_jobs_tenant_created_at', 'jobs', ['tenant', 'created_at'], unique=False)
    op.create_unique_constraint(op.f('uq_jobs_tenant_idempotency_key'), 'jobs', ['tenant', 'idempotency_key'])
    op.create_foreign_key(op.f('fk_jobs_tenant_tenants'), 'jobs', 'tenants', ['tenant'], ['name'])


def downgrade() -> None:
    op.drop_constraint(op.f('fk_jobs_tenant_tenants'), 'jobs', type_='foreignkey')
    op.drop_constraint(op.f('uq_jobs_tenant_idempotency_key'), 'jobs', type_='unique')
    op.drop_index('ix_jobs_tenant_created_at', table_name='jobs')
    op.create_unique_constraint(op.f('uq_jobs_idempotency_key'), 'jobs', ['idempotency_key'], postgresql_nulls_not_distinct=False)
    op.drop_column('jobs', 'tenant')
    op.drop_constraint(op.f('fk_files_tenant_tenants'), 'files', type_='foreignkey')
    op.drop_index(op.f('ix_files_tenant'), table_name='files')
    op.drop_column('files', 'tenant')
    op.drop_constraint(op.f('fk_batches_tenant_tenants'), 'batches', type_='foreignkey')
    op.drop_index('ix_batches_tenant_created_at', table_name='batches')
    op.drop_column('batches', 'tenant')
    op.drop_index(op.f('ix_api_keys_tenant'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('tenants')
