"""trials: the standard errors of the reward and the tax, and the records behind them

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 03:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hmaopt_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reward_se', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('tax_se', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('n_reward', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('n_tax', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hmaopt_trials', schema=None) as batch_op:
        batch_op.drop_column('n_tax')
        batch_op.drop_column('n_reward')
        batch_op.drop_column('tax_se')
        batch_op.drop_column('reward_se')
