"""jobs.closed_at and job_parts: a job may be sent in several requests (open,
add parts, close), so that its first radiographs are processed while the rest
are still arriving.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 22:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every job before this revision was submitted whole: not receiving (also what older code inserts).
    op.add_column('jobs', sa.Column('receiving', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column('jobs', sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table('job_parts',
    sa.Column('id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('job_id', sa.Uuid(as_uuid=False), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_sha256', sa.String(length=64), nullable=True),
    sa.Column('first_position', sa.Integer(), nullable=False),
    sa.Column('image_count', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_parts_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_parts')),
    sa.UniqueConstraint('job_id', 'idempotency_key', name='uq_job_parts_job_idempotency')
    )
    with op.batch_alter_table('job_parts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_parts_job_id'), ['job_id'], unique=False)


def downgrade() -> None:
    # A job still receiving parts keeps the images it has; the older code treats it as submitted
    # whole, so its callback, held while it was receiving (db.jobs.CALLBACK_HELD), is released.
    # A plain DROP COLUMN, as in 0002 (no batch copy on SQLite).
    op.execute("UPDATE jobs SET callback_state = NULL WHERE callback_state = 'receiving'")
    with op.batch_alter_table('job_parts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_parts_job_id'))
    op.drop_table('job_parts')
    op.drop_column('jobs', 'closed_at')
    op.drop_column('jobs', 'receiving')
