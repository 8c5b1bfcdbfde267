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
    op.add_column('jobs', sa.Column('request_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), never a batch "copy and move": on SQLite that
    # drops and recreates jobs, and with foreign keys on, the DROP TABLE would cascade to every image row.
    op.drop_column('jobs', 'request_sha256')
