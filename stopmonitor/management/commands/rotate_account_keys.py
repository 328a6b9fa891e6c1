"""``python manage.py rotate_account_keys``: re-encrypt every exchange account's secret with the first key.

Rotation: put the new Fernet key first in ``ACCOUNT_ENCRYPTION_KEYS`` (keep the old one after it),
run this, then drop the old key. Prints one JSON line ``{"rotated": N, "undecryptable": [ids]}``.
Exit status: 0 all rotated; 1 when some secret no configured key decrypts (those rows are left as
they were); 2 on error (one line, no secret).
"""

from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Re-encrypt every exchange account secret with the first ACCOUNT_ENCRYPTION_KEYS key."

    def handle(self, *args, **opts):
        from django.db import DatabaseError

        from stopmonitor.account_crypto import AccountCryptoError
        from stopmonitor.accounts import rotate_all
        from stopmonitor.preflight import require_migrated

        require_migrated(returncode=2)  # "run migrate" in one line, exit 2 (1 is "undecryptable")
        try:
            rotated, failed = rotate_all()
        except (AccountCryptoError, DatabaseError) as exc:
            self.stderr.write(f"rotate_account_keys: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            sys.exit(2)
        self.stdout.write(json.dumps({"rotated": rotated, "undecryptable": failed}))
        if failed:
            sys.exit(1)
