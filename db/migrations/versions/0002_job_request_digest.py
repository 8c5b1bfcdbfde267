"""jobs.request_sha256: the fingerprint of a submission, so an Idempotency-Key
reused for a different batch is refused (422) instead of answered with the
first job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 02:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: jobs made before this revision have no fingerprint, and their keys are trusted as before.
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('request_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('request_sha256')
