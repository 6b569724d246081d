"""The limits the Python side checks before a round trip, in one place.

The database holds the same rules again (ledger.settings, the CHECK constraints
and domains of sql/ledger.sql and sql/api.sql), whatever the code does: these
copies only refuse bad input early, and tests/test_limits.py proves the two agree.
"""

from __future__ import annotations

# ledger.settings: the largest amount one operation moves, and the longest hold.
MAX_AMOUNT = 100_000_000
MAX_RESERVATION_TTL_SECONDS = 7 * 24 * 3600
MAX_REASON_LENGTH = 200
MAX_METADATA_BYTES = 4096
# ledger.settings.max_lot_term: the longest a credit stays pending or lasts
# before it expires (10 years, of 365.25 days as PostgreSQL counts them).
MAX_LOT_TERM_SECONDS = 315_576_000

# accounts_user_id_format and ledger._is_name: user ids and action sources.
NAME_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
# ledger.idempotency_key and ledger._is_token: idempotency keys and external ids.
TOKEN_PATTERN = r"^[!-~]{1,255}$"
# A reason is printable: no control characters.
REASON_PATTERN = r"^[^\x00-\x1f\x7f]+$"

# ledger.settings.max_batch_items: the most credits one call of ledger.credit_many takes.
MAX_BULK_ITEMS = 1000
# rules.act: the largest action value (minor currency units).
MAX_ACTION_VALUE = 1_000_000_000_000

# ledger.entries_page: the largest page.
MAX_PAGE = 500

# api.keys: the scopes a key can carry (admin implies the others) and its name.
SCOPES = ("points:earn", "points:redeem", "points:read", "admin")
MAX_KEY_NAME_LENGTH = 100
