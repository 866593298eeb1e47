"""pipelines: pipelines, runs, promotions, webhook deliveries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 09:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hmaopt_pipeline_runs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('pipeline_id', sa.String(length=32), nullable=False),
    sa.Column('scheduled_for', sa.DateTime(timezone=True), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('checkpoint', sa.Text(), nullable=True),
    sa.Column('base_checkpoint', sa.Text(), nullable=True),
    sa.Column('fingerprint', sa.String(length=64), nullable=True),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('warm_start', sa.JSON(), nullable=True),
    sa.Column('decision', sa.String(length=16), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('reward', sa.Float(), nullable=True),
    sa.Column('tax', sa.Float(), nullable=True),
    sa.Column('holdout_reward', sa.Float(), nullable=True),
    sa.Column('holdout_tax', sa.Float(), nullable=True),
    sa.Column('gain', sa.Float(), nullable=True),
    sa.Column('champion_reward', sa.Float(), nullable=True),
    sa.Column('champion_run_id', sa.String(length=32), nullable=True),
    sa.Column('champion_job_id', sa.String(length=32), nullable=True),
    sa.Column('promoted_dir', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('pipeline_id', 'scheduled_for', name='uq_hmaopt_pipeline_runs_due')
    )
    with op.batch_alter_table('hmaopt_pipeline_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hmaopt_pipeline_runs_pipeline_id'), ['pipeline_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_hmaopt_pipeline_runs_status'), ['status'], unique=False)

    op.create_table('hmaopt_pipelines',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('paused', sa.Boolean(), nullable=False),
    sa.Column('next_due_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('champion_run_id', sa.String(length=32), nullable=True),
    sa.Column('rollback_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('token_id', sa.String(length=32), nullable=True),
    sa.Column('created_by', sa.String(length=100), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('hmaopt_pipelines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hmaopt_pipelines_next_due_at'), ['next_due_at'], unique=False)

    op.create_table('hmaopt_promotions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('pipeline_id', sa.String(length=32), nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('dir', sa.Text(), nullable=False),
    sa.Column('previous_run_id', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('hmaopt_promotions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hmaopt_promotions_pipeline_id'), ['pipeline_id'], unique=False)

    op.create_table('hmaopt_webhook_deliveries',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('pipeline_id', sa.String(length=32), nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=True),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('msg_id', sa.String(length=64), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_status_code', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('hmaopt_webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hmaopt_webhook_deliveries_pipeline_id'), ['pipeline_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_hmaopt_webhook_deliveries_status'), ['status'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('hmaopt_webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hmaopt_webhook_deliveries_status'))
        batch_op.drop_index(batch_op.f('ix_hmaopt_webhook_deliveries_pipeline_id'))

    op.drop_table('hmaopt_webhook_deliveries')
    with op.batch_alter_table('hmaopt_promotions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hmaopt_promotions_pipeline_id'))

    op.drop_table('hmaopt_promotions')
    with op.batch_alter_table('hmaopt_pipelines', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hmaopt_pipelines_next_due_at'))

    op.drop_table('hmaopt_pipelines')
    with op.batch_alter_table('hmaopt_pipeline_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hmaopt_pipeline_runs_status'))
        batch_op.drop_index(batch_op.f('ix_hmaopt_pipeline_runs_pipeline_id'))

    op.drop_table('hmaopt_pipeline_runs')
