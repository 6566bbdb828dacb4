"""CHECK constraints on job, request, task and batch states

The states are text columns kept to the values of service/states.py by a CHECK constraint each
(cheaper to change than a Postgres enum: a new state drops and re-adds one constraint). Added NOT
VALID and then validated, so existing rows are checked under a lock that does not block writes.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

# Frozen here, as they were when this revision was written: a later state is a later migration.
STATES = {
    ('jobs', 'status'): ('queued', 'running', 'finalizing', 'succeeded', 'failed', 'cancelled', 'deleting'),
    ('requests', 'state'): ('pending', 'done', 'failed', 'cancelled'),
    ('tasks', 'state'): ('pending', 'leased', 'done', 'failed', 'idle'),
    ('batches', 'status'): ('validating', 'in_progress', 'finalizing', 'completed', 'failed', 'cancelling',
                            'cancelled', 'expired'),
}


def upgrade() -> None:
    for (table, column), values in STATES.items():
        name = f'ck_{table}_{column}'
        allowed = ', '.join(f"'{value}'" for value in values)
        op.execute(f'ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({column} IN ({allowed})) NOT VALID')
        op.execute(f'ALTER TABLE {table} VALIDATE CONSTRAINT {name}')


def downgrade() -> None:
    for table, column in STATES:
        op.drop_constraint(f'ck_{table}_{column}', table, type_='check')
