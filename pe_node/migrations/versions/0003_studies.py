"""studies: one decision and one result per study; jobs belong to a study, series get decision states

A job now analyses a study (the series its selection rules chose), so it refers to its study; its series is the
one it analysed, unknown until it runs. Existing jobs get the study of their series; series that had a job
("complete") were analysed.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=True),
        sa.Column("reported", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_instance_uid"),
    )
    op.execute(
        "INSERT INTO studies (study_instance_uid, created_at) "
        "SELECT study_instance_uid, MIN(first_received_at) FROM series GROUP BY study_instance_uid"
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_id", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE jobs SET study_id = (SELECT st.id FROM studies st JOIN series s "
        "ON s.study_instance_uid = st.study_instance_uid WHERE s.id = jobs.series_id)"
    )
    # The first schema left the foreign key unnamed: PostgreSQL named it, SQLite's batch copy names it by convention.
    sqlite = op.get_bind().dialect.name == "sqlite"
    naming = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"} if sqlite else {}
    old_key = "fk_jobs_series_id_series" if sqlite else "jobs_series_id_fkey"
    with op.batch_alter_table("jobs", schema=None, naming_convention=naming) as batch_op:
        batch_op.alter_column("study_id", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("series_id", existing_type=sa.Integer(), nullable=True)
        batch_op.drop_constraint(old_key, type_="foreignkey")
        batch_op.create_foreign_key("jobs_series_id_fkey", "series", ["series_id"], ["id"], ondelete="SET NULL")
        batch_op.create_foreign_key("jobs_study_id_fkey", "studies", ["study_id"], ["id"], ondelete="CASCADE")
        batch_op.create_index(batch_op.f("ix_jobs_study_id"), ["study_id"], unique=False)
    op.execute("UPDATE series SET state = 'analysed' WHERE state = 'complete'")


def downgrade() -> None:
    op.execute("UPDATE series SET state = 'complete' WHERE state IN ('analysed', 'not_chosen', 'deciding', 'quiet')")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_study_id"))
        batch_op.drop_constraint("jobs_study_id_fkey", type_="foreignkey")
        batch_op.drop_column("study_id")
    op.drop_table("studies")
