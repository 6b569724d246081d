<%
    import re

    # The revision's SQL file is named like the revision file itself: alembic.ini
    # names that one %(rev)s_%(slug)s, its slug made of the message's words in
    # lower case joined by "_", cut at truncate_slug_length (40) on a word boundary.
    slug = "_".join(re.findall(r"\w+", message)).lower()
    if len(slug) > 40:
        slug = slug[:40].rsplit("_", 1)[0] + "_"
    sql_file = f"migrations/sql/{up_revision}_{slug}.sql"
%>\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from app.operations.migrate import run_sql_file

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    run_sql_file("${sql_file}")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
