"""Cache byte budget: result-shard bytes counted in cache_usage, kept by a trigger on shards

cache_usage holds the stored bytes and count of result shards in 16 slots (a shard adds to the
slot its id hashes to), so the retention sweep reads the cache's size from 16 rows instead of
summing the shards table, and concurrent workers indexing shards rarely wait on one row. The
trigger counts every insert and delete of a result shard, whatever statement makes it.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

SLOTS = 16

COUNT_RESULT_SHARDS = f"""
CREATE FUNCTION count_result_shard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND NEW.kind = 'result' THEN
        UPDATE cache_usage SET shards = shards + 1, bytes = bytes + NEW.bytes
         WHERE slot = abs(hashtext(NEW.id)) % {SLOTS};
    ELSIF TG_OP = 'DELETE' AND OLD.kind = 'result' THEN
        UPDATE cache_usage SET shards = shards - 1, bytes = bytes - OLD.bytes
         WHERE slot = abs(hashtext(OLD.id)) % {SLOTS};
    END IF;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.create_table(
        'cache_usage',
        sa.Column('slot', sa.SmallInteger(), nullable=False),
        sa.Column('shards', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('bytes', sa.BigInteger(), server_default='0', nullable=False),
        sa.PrimaryKeyConstraint('slot', name=op.f('pk_cache_usage')),
    )
    # Once, at upgrade: the result shards that exist now, in the slots the trigger will use.
    op.execute(f"""
        INSERT INTO cache_usage (slot, shards, bytes)
        SELECT g.slot, count(s.id), coalesce(sum(s.bytes), 0)
          FROM generate_series(0, {SLOTS - 1}) AS g(slot)
          LEFT JOIN shards s ON s.kind = 'result' AND abs(hashtext(s.id)) % {SLOTS} = g.slot
         GROUP BY g.slot
    """)
    op.execute(COUNT_RESULT_SHARDS)
    op.execute("CREATE TRIGGER shards_count_result AFTER INSERT OR DELETE ON shards "
               "FOR EACH ROW EXECUTE FUNCTION count_result_shard()")


def downgrade() -> None:
    op.execute("DROP TRIGGER shards_count_result ON shards")
    op.execute("DROP FUNCTION count_result_shard()")
    op.drop_table('cache_usage')
