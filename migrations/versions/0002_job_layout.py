"""jobs: the layer layout of the job's grouping (for the dashboard's per-layer ratio profile)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 10:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hmaopt_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('layout', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hmaopt_jobs', schema=None) as batch_op:
        batch_op.drop_column('layout')
