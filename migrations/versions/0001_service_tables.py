"""service tables: jobs, trials, tokens, workers

Revision ID: 0001
Revises:
Create Date: 2026-11-22 06:07:49.462525
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hmaopt_jobs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('token_id', sa.String(length=32), nullable=True),
    sa.Column('submitted_by', sa.String(length=100), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('n_trials', sa.Integer(), nullable=False),
    sa.Column('parallel', sa.Integer(), nullable=False),
    sa.Column('trials_finished', sa.Integer(), nullable=False),
    sa.Column('trials_pruned', sa.Integer(), nullable=False),
    sa.Column('best_trial', sa.Integer(), nullable=True),
    sa.Column('best_reward', sa.Float(), nullable=True),
    sa.Column('best_tax', sa.Float(), nullable=True),
    sa.Column('best_ratios', sa.JSON(), nullable=True),
    sa.Column('baseline_ratio', sa.Float(), nullable=True),
    sa.Column('baseline_reward', sa.Float(), nullable=True),
    sa.Column('baseline_tax', sa.Float(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('runs_enqueued', sa.Integer(), nullable=False),
    sa.Column('finalizer', sa.String(length=32), nullable=True),
    sa.Column('export_status', sa.String(length=16), nullable=True),
    sa.Column('export_dir', sa.Text(), nullable=True),
    sa.Column('export_error', sa.Text(), nullable=True),
    sa.Column('export_manifest', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_id', 'idempotency_key', name='uq_hmaopt_jobs_idempotency')
    )
    with op.batch_alter_table('hmaopt_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hmaopt_jobs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_hmaopt_jobs_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_hmaopt_jobs_status'), ['status'], unique=False)

    op.create_table('hmaopt_tokens',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('hmaopt_trials',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('ratios', sa.JSON(), nullable=False),
    sa.Column('reward', sa.Float(), nullable=True),
    sa.Column('tax', sa.Float(), nullable=False),
    sa.Column('feasible', sa.Boolean(), nullable=False),
    sa.Column('stage', sa.Integer(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('task_tax', sa.JSON(), nullable=False),
    sa.Column('uniform_ratio', sa.Float(), nullable=True),
    sa.Column('merge_seconds', sa.Float(), nullable=False),
    sa.Column('eval_seconds', sa.Float(), nullable=False),
    sa.Column('worker_id', sa.String(length=32), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'number', name='uq_hmaopt_trials_job_number')
    )
    with op.batch_alter_table('hmaopt_trials', schema=None) as batch_op:
        batch_op.create_index('ix_hmaopt_trials_job_reward', ['job_id', 'reward'], unique=False)

    op.create_table('hmaopt_workers',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('hostname', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('hmaopt_workers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hmaopt_workers_state'), ['state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('hmaopt_workers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hmaopt_workers_state'))

    op.drop_table('hmaopt_workers')
    with op.batch_alter_table('hmaopt_trials', schema=None) as batch_op:
        batch_op.drop_index('ix_hmaopt_trials_job_reward')

    op.drop_table('hmaopt_trials')
    op.drop_table('hmaopt_tokens')
    with op.batch_alter_table('hmaopt_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hmaopt_jobs_status'))
        batch_op.drop_index(batch_op.f('ix_hmaopt_jobs_name'))
        batch_op.drop_index(batch_op.f('ix_hmaopt_jobs_created_at'))

    op.drop_table('hmaopt_jobs')
