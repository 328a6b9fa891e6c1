"""``python manage.py doctor [--quick] [--json]``: the start-up investigation checklist as one command.

What it reports
    * the configuration: environment, venue, and for every value which spelling it was read
      from (``SECRET_KEY`` or ``RBS_SECRET_KEY``, ``DATABASE_URL`` or ``RBS_PG_*``, ...).
      Secret values are never printed (``***``); URLs are shown without their credentials.
    * checks, each ``ok`` / ``warn`` / ``fail`` / ``skip`` with a one-line fix on failure:
      database reachable (and its version), migrations applied and no INVALID index (not with
      ``--quick``), Redis and RabbitMQ TCP when configured, the cache round trip, a writable
      temp dir, the working directory (read-only is fine), the static manifest outside
      development, and Binance (reachable, clock offset, whether the keys can trade) when the
      venue is Binance and ``--quick`` is not given.

Exit status
    0 every required check passed (warnings allowed); 1 a required check failed;
    78 (EX_CONFIG) configuration error. A missing required variable never reaches this
    command: ``config.settings`` already prints one line and exits 78 while Django loads.
    ``-- COMMAND`` that cannot be run: one line, 127 not found, 126 not executable.

``docker/entrypoint.sh`` runs ``doctor --quick`` before every process. The module imports only
the standard library at import time; Django's database and cache machinery is loaded inside
the checks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlencode, urlparse

from django.core.management.base import BaseCommand, CommandError

EX_OK = 0
EX_FAILED = 1
EX_CONFIG = 78

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

BINANCE_MAINNET = "https://api.binance.com"
BINANCE_TESTNET = "https://testnet.binance.vision"
CLOCK_OFFSET_WARN_MS = 1000


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""
    fix: str = ""
    required: bool = True
    retryable: bool = False  # a dependency that may only be late (connection refused, starting up)

    @property
    def shown_status(self) -> str:
        """The table's STATUS column: a failed check that is not required shows as WARN."""
        return self.status.upper() if self.required or self.status != FAIL else "WARN"


@dataclass
class ConfigItem:
    name: str
    source: str  # the variable it was read from, "default" or "unset"
    value: str  # display value; "***" for secrets
    required: bool


def _lookup(name: str) -> str:
    from decouple import config as decouple_config

    return (decouple_config(name, default="") or "").strip()


def _first_spelling(names: tuple[str, ...]) -> str | None:
    for name in names:
        if _lookup(name):
            return name
    return None


def _safe_url(url: str | None) -> str:
    """``scheme://host:port/path`` without user or password."""
    if not url:
        return ""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}{parsed.path}"


def _one_line(text: str, secrets: list[str], limit: int = 200) -> str:
    from stopmonitor.logs import mask_secrets

    line = (str(text).strip().splitlines() or [""])[0]
    return mask_secrets(line, secrets)[:limit]


def _secrets() -> list[str]:
    from django.conf import settings

    values = [
        getattr(settings, "SECRET_KEY", ""),
        getattr(settings, "BINANCE_API_KEY", "") or "",
        getattr(settings, "BINANCE_API_SECRET", "") or "",
        settings.DATABASES.get("default", {}).get("PASSWORD", "") or "",
    ]
    for url in (getattr(settings, "REDIS_URL", None), getattr(settings, "RABBITMQ_URL", None)):
        if url and urlparse(url).password:
            values.append(urlparse(url).password)
    return [v for v in values if v and len(v) >= 3]


def config_summary() -> list[ConfigItem]:
    """Which spelling each value came from; values of secrets are masked."""
    from django.conf import settings

    from config.env import PG_PARTS, SPELLINGS

    strict = settings.ENVIRONMENT != "development"
    binance = str(settings.EXCHANGE_VENUE).startswith("binance")
    items: list[ConfigItem] = []

    def add(name, spellings, value, required, secret=False, default="default"):
        source = _first_spelling(spellings) or (default if value else "unset")
        shown = ("***" if value else "") if secret else value
        items.append(ConfigItem(name, source, shown, required))

    add("ENVIRONMENT", ("ENVIRONMENT", "RBS_ENVIRONMENT"), settings.ENVIRONMENT, False)
    add("SECRET_KEY", SPELLINGS["SECRET_KEY"], settings.SECRET_KEY, strict, secret=True)
    add("ALLOWED_HOSTS", ("ALLOWED_HOSTS", "RBS_ALLOWED_HOSTS"), ",".join(settings.ALLOWED_HOSTS), strict)

    db = settings.DATABASES["default"]
    if _lookup("DATABASE_URL"):
        db_source = "DATABASE_URL"
    elif any(_lookup(p) for p in PG_PARTS):
        db_source = "RBS_PG_*"
    else:
        db_source = "default"
    engine = db["ENGINE"].rsplit(".", 1)[-1]
    if engine == "sqlite3":
        db_value = f"sqlite3 {db['NAME']}"
    else:
        db_value = f"{engine} {db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}/{db['NAME']}"
    items.append(ConfigItem("DATABASE", db_source, db_value, strict))

    add("REDIS_URL", SPELLINGS["REDIS_URL"], _safe_url(settings.REDIS_URL), strict)
    add("RABBITMQ_URL", SPELLINGS["RABBITMQ_URL"], _safe_url(settings.RABBITMQ_URL), False)
    add("EXCHANGE_VENUE", ("EXCHANGE_VENUE", "RBS_EXCHANGE_VENUE"), settings.EXCHANGE_VENUE, False)
    add("BINANCE_TESTNET", ("BINANCE_TESTNET",), str(settings.BINANCE_TESTNET).lower(), False)
    add("BINANCE_API_KEY", ("BINANCE_API_KEY", "RBS_BINANCE_API_KEY"), settings.BINANCE_API_KEY, binance, secret=True)
    add(
        "BINANCE_API_SECRET",
        ("BINANCE_API_SECRET", "RBS_BINANCE_API_SECRET"),
        settings.BINANCE_API_SECRET,
        binance,
        secret=True,
    )
    add("BINANCE_API_URL", ("BINANCE_API_URL", "RBS_BINANCE_API_URL"), settings.BINANCE_API_URL or "", False)
    return items


# --------------------------------------------------------------------------- checks


def database_address() -> str:
    """``host:port`` of the configured PostgreSQL (a socket directory as given), or the SQLite file."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return str(db["NAME"])
    return f"{db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}"


# PostgreSQL answers that may only mean "not yet": cannot_connect_now (starting up, shutting down,
# in recovery), too_many_connections; no SQLSTATE at all is a refused/timed-out/unresolved connection
_LATE_SQLSTATES = {"57P03", "53300"}


# the server's definite answers (psycopg reports a refused connection without a SQLSTATE, so
# the text tells them apart): waiting would not change them
_DEFINITE = ("authentication failed", "does not exist", "pg_hba.conf", "permission denied", "role ")


def _late(exc: Exception) -> bool:
    from django.db import OperationalError

    if not isinstance(exc, OperationalError):
        return False
    cause = exc.__cause__ or exc
    sqlstate = getattr(cause, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _LATE_SQLSTATES
    text = str(exc)
    return not any(marker in text for marker in _DEFINITE)


def check_database(secrets: list[str]) -> Check:
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SHOW server_version")
                version = f"PostgreSQL {cursor.fetchone()[0]}"
            elif connection.vendor == "sqlite":
                cursor.execute("SELECT sqlite_version()")
                version = f"SQLite {cursor.fetchone()[0]}"
            else:
                cursor.execute("SELECT 1")
                version = connection.vendor
        return Check("database", OK, f"{version} at {database_address()}")
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        connection.close()
        address = database_address()
        if connection.vendor == "sqlite":
            fix = f"the SQLite file {address} cannot be opened: make its folder writable, or set DATABASE_URL"
        else:
            fix = (
                f"check DATABASE_URL / RBS_PG_* (host, port, user, password) and that PostgreSQL is up and "
                f"reachable at {address} (k8s: the Service and NetworkPolicy allow-backend-to-deps)"
            )
        return Check("database", FAIL, f"{address}: {type(exc).__name__}: {_one_line(exc, secrets)}", fix,
                     retryable=_late(exc))


def check_migrations(secrets: list[str]) -> Check:
    from stopmonitor.preflight import MIGRATE_FIX, pending_migrations

    try:
        plan = pending_migrations()
    except Exception as exc:  # noqa: BLE001
        return Check("migrations", FAIL, f"{type(exc).__name__}: {_one_line(exc, secrets)}", "fix the database check first")
    if plan:
        more = f" (+{len(plan) - 3} more)" if len(plan) > 3 else ""
        return Check("migrations", FAIL, f"{len(plan)} unapplied: {', '.join(plan[:3])}{more}", MIGRATE_FIX)
    return Check("migrations", OK, "all applied")


def check_protection(secrets: list[str]) -> Check:
    """Exchange-held protection: the tenants' settings for the configured venue and how many
    ACTIVE operations with a stop rest no protection (../shared/design/protection.md)."""
    from django.conf import settings
    from django.db.models import Q

    from api.models import Client, Operation
    from stopmonitor.protection import protection_enabled

    venue = settings.EXCHANGE_VENUE
    try:
        tenants = list(Client.objects.values_list("id", "risk_config__protection_enabled",
                                                  "risk_config__protection_buffer_bps"))
        on = {tid for tid, enabled, _ in tenants if protection_enabled(enabled, venue)}
        buffers = sorted({bps if bps is not None else 50 for tid, _, bps in tenants if tid in on})
        watched = Operation.objects.filter(status="ACTIVE", stop_price__isnull=False, client_id__in=on)
        bare = watched.filter(Q(protection__isnull=True) | ~Q(protection__status="PLACED")).count()
        total = watched.count()
    except Exception as exc:  # noqa: BLE001
        return Check("protection", FAIL, f"{type(exc).__name__}: {_one_line(exc, secrets)}",
                     "fix the database and migrations checks first", required=False)
    detail = (f"venue {venue}: on for {len(on)} of {len(tenants)} tenants (buffer bps {buffers or '-'}); "
              f"{total - bare} of {total} ACTIVE operations with a stop rest protection")
    if bare:
        return Check("protection", WARN, detail, "python manage.py protect_operations (or wait for the next "
                                                  "pass's audit); see /risk/config/ protection_enabled", required=False)
    return Check("protection", OK, detail, required=False)


def check_account_secrets(secrets: list[str]) -> Check:
    """Every exchange account's secret decrypts with ``ACCOUNT_ENCRYPTION_KEYS`` (issue #20)."""
    try:
        from api.models import ExchangeAccount
        from stopmonitor.accounts import undecryptable

        total = ExchangeAccount.objects.count()
        if total == 0:
            return Check("account_secrets", OK, "no exchange accounts (the environment's keys are the default)",
                         required=False)
        bad = undecryptable()
    except Exception as exc:  # noqa: BLE001 - one line, never a stack trace
        return Check("account_secrets", FAIL, f"{type(exc).__name__}: {_one_line(exc, secrets)}",
                     "fix the database and migrations checks first")
    if bad:
        names = ", ".join(f"{pk} ({label})" for pk, label in bad[:5])
        return Check("account_secrets", FAIL, f"{len(bad)} of {total} accounts do not decrypt: {names}",
                     "put the key they were encrypted with in ACCOUNT_ENCRYPTION_KEYS (after the new first key), "
                     "then run: python manage.py rotate_account_keys")
    return Check("account_secrets", OK, f"{total} accounts decrypt")


def check_invalid_indexes(secrets: list[str]) -> Check:
    from django.db import connection

    if connection.vendor != "postgresql":
        return Check("invalid_indexes", SKIP, f"not applicable to {connection.vendor}", required=False)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE NOT i.indisvalid AND n.nspname = current_schema() ORDER BY 1"
            )
            invalid = [row[0] for row in cursor.fetchall()]
    except Exception as exc:  # noqa: BLE001
        return Check("invalid_indexes", FAIL, f"{type(exc).__name__}: {_one_line(exc, secrets)}", "fix the database check first")
    if invalid:
        return Check(
            "invalid_indexes",
            FAIL,
            "INVALID: " + ", ".join(invalid),
            "an interrupted CREATE INDEX CONCURRENTLY (migration 0018 waiting behind another transaction): "
            "run `python manage.py migrate` again, it drops and rebuilds it (k8s: delete and re-apply the "
            "migrate Job); by hand: REINDEX INDEX CONCURRENTLY " + invalid[0],
        )
    return Check("invalid_indexes", OK, "none")


def url_address(url: str, default_port: int) -> str:
    """``host:port`` of a service URL (the scheme's default port when none is given)."""
    parsed = urlparse(url)
    return f"{parsed.hostname or 'localhost'}:{parsed.port or default_port}"


def _tcp(url: str, default_port: int, timeout: float = 2.0) -> None:
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname or "localhost", parsed.port or default_port), timeout=timeout):
        pass


def check_tcp(name: str, url: str | None, default_port: int, variable: str) -> Check:
    """TCP connect to ``url``; the fix names ``variable`` and the configured host:port."""
    if not url:
        return Check(name, SKIP, "not configured", required=False)
    address = url_address(url, default_port)
    try:
        _tcp(url, default_port)
        return Check(name, OK, _safe_url(url))
    except OSError as exc:
        return Check(name, FAIL, f"{address}: {type(exc).__name__}: {exc.strerror or exc}",
                     f"check {variable} (or RBS_{variable}) and that {name} listens on {address}", retryable=True)


def check_cache(secrets: list[str], redis_ok: bool | None) -> Check:
    from django.conf import settings

    backend = settings.CACHES["default"]["BACKEND"].rsplit(".", 2)[-2]
    if redis_ok is False:
        return Check("cache", FAIL, f"{backend}: Redis unreachable", "fix the redis check first")
    try:
        from django.core.cache import cache

        key = f"doctor:{os.getpid()}:{time.monotonic_ns()}"
        cache.set(key, "1", 10)
        value = cache.get(key)
        cache.delete(key)
        if value != "1":
            raise RuntimeError("value written was not read back")
        where = settings.CACHES["default"].get("LOCATION", "") if backend == "filebased" else ""
        return Check("cache", OK, f"{backend} {where}".strip())
    except Exception as exc:  # noqa: BLE001
        return Check(
            "cache",
            FAIL,
            f"{backend}: {type(exc).__name__}: {_one_line(exc, secrets)}",
            "set REDIS_URL (or RBS_REDIS_URL), or make CACHE_DIR writable (a writable /tmp: emptyDir / --tmpfs /tmp)",
        )


def check_tmp_writable(file_cache: bool) -> Check:
    tmp = tempfile.gettempdir()
    try:
        with tempfile.NamedTemporaryFile(prefix="doctor-", dir=tmp) as handle:
            handle.write(b"ok")
            handle.flush()
        return Check("temp_dir", OK, f"{tmp} writable", required=file_cache)
    except OSError as exc:
        return Check(
            "temp_dir",
            FAIL if file_cache else WARN,
            f"{tmp}: {type(exc).__name__}: {exc.strerror or exc}",
            "mount a writable /tmp (k8s: emptyDir at /tmp; docker: --tmpfs /tmp)",
            required=file_cache,
        )


def check_working_dir() -> Check:
    cwd = os.getcwd()
    writable = os.access(cwd, os.W_OK)
    detail = f"{cwd} {'writable' if writable else 'read-only'} (nothing is written there; both are fine)"
    return Check("working_dir", OK, detail, required=False)


def check_static() -> Check:
    from django.conf import settings

    if settings.DEBUG:
        return Check("static_manifest", SKIP, "DEBUG: files served from the apps", required=False)
    manifest = os.path.join(str(settings.STATIC_ROOT), "staticfiles.json")
    if os.path.isfile(manifest):
        return Check("static_manifest", OK, manifest)
    return Check(
        "static_manifest",
        FAIL,
        f"{manifest} missing",
        "run collectstatic at build time with the manifest storage (docker/Dockerfile does: "
        "ENVIRONMENT=development DEBUG=false manage.py collectstatic --noinput)",
    )


def _http_json(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict]:
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    request = Request(url, headers=headers or {})
    try:
        with urlopen(request, timeout=timeout) as response:  # noqa: S310 - https to the exchange
            return response.status, json.loads(response.read() or b"{}")
    except HTTPError as err:
        try:
            body = json.loads(err.read() or b"{}")
        except ValueError:
            body = {}
        return err.code, body


def _binance_base() -> tuple[str, str]:
    """``(REST base without a trailing /api, "testnet" or "mainnet")`` from BINANCE_API_URL / BINANCE_TESTNET."""
    from django.conf import settings

    base = (settings.BINANCE_API_URL or (BINANCE_TESTNET if settings.BINANCE_TESTNET else BINANCE_MAINNET)).rstrip("/")
    base = base.removesuffix("/api")  # python-binance's REST base (…/api) is accepted too, as the adapter does
    network = "testnet" if settings.BINANCE_TESTNET else "mainnet"
    return base, network


def _clock_offset_ms(base: str) -> int:
    """Server time minus the midpoint of our request (``GET /api/v3/time``), in ms; raises
    ``RuntimeError("HTTP <status>")`` on an answer without ``serverTime``, or what the request raised."""
    sent = time.time()
    status, body = _http_json(f"{base}/api/v3/time")
    received = time.time()
    if status != 200 or "serverTime" not in body:
        raise RuntimeError(f"HTTP {status}")
    return int(body["serverTime"] - (sent + received) / 2 * 1000)


def _clock_check(offset_ms: int) -> Check:
    """Not required: WARN beyond ``CLOCK_OFFSET_WARN_MS`` (signed calls may be refused)."""
    if abs(offset_ms) > CLOCK_OFFSET_WARN_MS:
        return Check("binance_clock", WARN, f"offset {offset_ms} ms", "sync the node clock (NTP); signed calls may be refused", False)
    return Check("binance_clock", OK, f"offset {offset_ms} ms", required=False)


def _keys_check(base: str, network: str, offset_ms: int, secrets: list[str]) -> Check:
    """One signed ``GET /api/v3/account`` (HMAC-SHA256, timestamp corrected by ``offset_ms``):
    OK when the keys are accepted and ``canTrade``; FAIL otherwise, with the exchange's code."""
    from django.conf import settings

    key, secret = settings.BINANCE_API_KEY or "", settings.BINANCE_API_SECRET or ""
    query = urlencode({"timestamp": int(time.time() * 1000 + offset_ms), "recvWindow": 5000, "omitZeroBalances": "true"})
    signature = hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()
    try:
        status, body = _http_json(f"{base}/api/v3/account?{query}&signature={signature}", {"X-MBX-APIKEY": key})
    except Exception as exc:  # noqa: BLE001
        return Check("binance_keys", FAIL, f"{type(exc).__name__}: {_one_line(exc, secrets)}", "retry; the exchange did not answer")
    if status != 200:
        code, msg = body.get("code"), body.get("msg", "")
        return Check(
            "binance_keys",
            FAIL,
            f"HTTP {status} code {code}: {_one_line(msg, secrets)}",
            f"the keys are not valid for {network} ({base}): check BINANCE_API_KEY/SECRET, BINANCE_TESTNET "
            "and the key's IP whitelist",
        )
    can_trade = bool(body.get("canTrade"))
    return Check(
        "binance_keys",
        OK if can_trade else FAIL,
        f"{network} keys accepted; canTrade={str(can_trade).lower()}",
        "" if can_trade else "enable Spot trading for this API key",
    )


def check_binance(secrets: list[str]) -> list[Check]:
    """Reachability and clock offset (``/api/v3/time``), then whether the keys can trade.
    An unreachable exchange is one FAIL and no further request."""
    from django.conf import settings

    venue = str(settings.EXCHANGE_VENUE)
    if not venue.startswith("binance"):
        return [Check("binance", SKIP, f"venue {venue}", required=False)]
    base, network = _binance_base()
    try:
        offset_ms = _clock_offset_ms(base)
    except Exception as exc:  # noqa: BLE001
        return [
            Check(
                "binance",
                FAIL,
                f"{base} ({network}): {type(exc).__name__}: {_one_line(exc, secrets)}",
                "allow HTTPS egress (NetworkPolicy allow-internet) or fix BINANCE_API_URL",
            )
        ]
    return [
        Check("binance", OK, f"{base} ({network}) reachable"),
        _clock_check(offset_ms),
        _keys_check(base, network, offset_ms, secrets),
    ]


def check_database_role(secrets: list[str]) -> Check:
    """Warn when the role this process connects as may do more than the runtime policy allows
    (owns tables, may TRUNCATE, may UPDATE/DELETE events, may CREATE in the schema, is a superuser):
    :func:`stopmonitor.roles.runtime_findings`. Not required: development runs as the superuser."""
    from django.db import connection

    from stopmonitor.roles import runtime_findings

    if connection.vendor != "postgresql":
        return Check("database_role", SKIP, f"not applicable to {connection.vendor}", required=False)
    try:
        with connection.cursor() as cursor:
            findings = runtime_findings(cursor)
    except Exception as exc:  # noqa: BLE001
        return Check("database_role", WARN, f"{type(exc).__name__}: {_one_line(exc, secrets)}", "", False)
    if findings:
        more = f" (+{len(findings) - 1} more)" if len(findings) > 1 else ""
        return Check("database_role", WARN, findings[0] + more,
                     "connect web, monitor, relay and jobs as the runtime role (manage.py setup_roles; the "
                     "owner role is for the migrate Job only)", False)
    return Check("database_role", OK, "least privilege (owns nothing, no TRUNCATE, events append-only)")


def check_imports() -> Check:
    """Every module a process imports only when it first needs it (stopmonitor.preflight.RUNTIME_IMPORTS)."""
    from stopmonitor.preflight import RUNTIME_IMPORTS, missing_modules

    missing = missing_modules()
    if missing:
        return Check("imports", FAIL, "missing: " + "; ".join(missing),
                     "the image was built without them: pip install -r requirements.txt, then rebuild")
    return Check("imports", OK, f"{len(RUNTIME_IMPORTS)} runtime modules")


def dependency_checks(secrets: list[str]) -> list[Check]:
    """PostgreSQL (a query), then Redis and RabbitMQ (TCP) when configured."""
    from django.conf import settings

    return [
        check_database(secrets),
        check_tcp("redis", settings.REDIS_URL, 6379, "REDIS_URL"),
        check_tcp("rabbitmq", settings.RABBITMQ_URL, 5672, "RABBITMQ_URL"),
    ]


def _log_line(payload: dict, text: str) -> None:
    from django.conf import settings

    from stopmonitor.logs import redact

    line = json.dumps(payload, separators=(",", ":")) if getattr(settings, "LOG_FORMAT", "text") == "json" else text
    sys.stdout.write(redact(line) + "\n")
    sys.stdout.flush()


def wait_for_dependencies(secrets: list[str], wait_seconds: float, sleep=time.sleep) -> tuple[list[Check], float]:
    """Run :func:`dependency_checks` until none fails for a reason that may only be late, or until
    ``wait_seconds`` have passed; returns the last checks and the seconds waited.

    Back-off 1, 2, 4, 8, 15, 15, ... s. Each attempt with a late dependency logs one line per such
    dependency naming its host:port and the cause (JSON with LOG_FORMAT=json). A dependency that
    answers with a definite refusal (wrong password, unknown database) is not waited for. The
    sleep is taken in steps of at most 1 s, so the process keeps making progress for an exec
    liveness probe.
    """
    started = time.monotonic()
    delay, attempt = 1.0, 0
    while True:
        attempt += 1
        checks = dependency_checks(secrets)
        late = [c for c in checks if c.status == FAIL and c.retryable]
        waited = time.monotonic() - started
        if not late or waited + delay > wait_seconds:
            if attempt > 1:
                state = "reachable" if not late else "still unreachable, giving up"
                _log_line({"type": "dependencies", "state": state, "attempts": attempt, "waited_s": round(waited, 1)},
                          f"doctor: dependencies {state} after {attempt} attempts, {waited:.1f} s")
            return checks, waited
        for check in late:
            address, _, cause = check.detail.partition(": ")
            _log_line(
                {"type": "waiting", "dependency": check.name, "address": address, "attempt": attempt,
                 "cause": cause, "retry_in_s": delay},
                f"doctor: waiting for {check.name} at {address} (attempt {attempt}, next in {delay:g} s): {cause}",
            )
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            sleep(min(1.0, deadline - time.monotonic()))
        delay = min(delay * 2, 15.0)


def _full_schema_checks(secrets: list[str]) -> list[Check]:
    """Migrations, INVALID indexes, protection, and the account secrets once migrations are applied."""
    migrations = check_migrations(secrets)
    checks = [migrations, check_invalid_indexes(secrets), check_protection(secrets)]
    checks.append(check_account_secrets(secrets) if migrations.status == OK
                  else Check("account_secrets", SKIP, "migrations not applied", required=False))
    return checks


def _quick_schema_checks(secrets: list[str], index_check: bool) -> list[Check]:
    """``--quick``: pending migrations only warn (a process may start on them: the web answers
    readiness 503, commands refuse with one line); an INVALID index is refused unless
    ``index_check=False``."""
    pending = check_migrations(secrets)
    pending.required = False
    return [pending, check_invalid_indexes(secrets)] if index_check else [pending]


def _database_checks(secrets: list[str], database: Check, quick: bool, index_check: bool) -> list[Check]:
    """What needs a reachable database: its role, then the schema checks (full or ``--quick``)."""
    if database.status != OK:
        return [] if quick else [Check("migrations", SKIP, "database unreachable", required=False)]
    role = check_database_role(secrets)
    return [role, *(_quick_schema_checks(secrets, index_check) if quick else _full_schema_checks(secrets))]


def _dependency_part(secrets: list[str], quick: bool, wait_seconds: float, index_check: bool) -> list[Check]:
    """PostgreSQL (waited for up to ``wait_seconds``) and what needs it, then Redis, RabbitMQ and the cache."""
    deps, _ = wait_for_dependencies(secrets, wait_seconds) if wait_seconds > 0 else (dependency_checks(secrets), 0)
    database, redis, rabbit = deps
    checks = [database, *_database_checks(secrets, database, quick, index_check), redis, rabbit]
    redis_ok = None if redis.status == SKIP else redis.status == OK
    checks.append(check_cache(secrets, redis_ok))
    return checks


def _process_part(secrets: list[str], quick: bool) -> list[Check]:
    """What the process itself needs: imports, a temp dir, the working dir, static files, and
    Binance (not with ``--quick``)."""
    from django.conf import settings

    file_cache = "filebased" in settings.CACHES["default"]["BACKEND"].lower()
    checks = [check_imports(), check_tmp_writable(file_cache), check_working_dir(), check_static()]
    if quick:
        checks.append(Check("binance", SKIP, "--quick", required=False))
    else:
        checks.extend(check_binance(secrets))
    return checks


def run_checks(quick: bool, wait_seconds: float = 0.0, dependencies: bool = True, others: bool = True,
               index_check: bool = True) -> list[Check]:
    """Every check, in order. ``dependencies=False`` leaves out PostgreSQL, Redis, RabbitMQ and the
    cache (the web start: those are waited for in the background, readiness reports them);
    ``others=False`` runs only those. ``--quick`` still refuses an INVALID index unless
    ``index_check=False`` (the migrate Job: migrate is what repairs it)."""
    secrets = _secrets()
    checks: list[Check] = []
    if dependencies:
        checks += _dependency_part(secrets, quick, wait_seconds, index_check)
    if others:
        checks += _process_part(secrets, quick)
    return checks


# --------------------------------------------------------------------------- command


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    widths[-1] = 0  # the last column is not padded
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _read_configuration() -> tuple[str, str, list[ConfigItem]]:
    """``(ENVIRONMENT, EXCHANGE_VENUE, config_summary())``; a configuration the settings module let
    through but that cannot be read is one line on stderr and exit 78 (EX_CONFIG)."""
    try:
        from django.conf import settings

        return settings.ENVIRONMENT, settings.EXCHANGE_VENUE, config_summary()
    except Exception as exc:  # noqa: BLE001 - a configuration the settings module let through
        sys.stderr.write(f"stopmonitor: configuration error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n")
        sys.stderr.flush()
        sys.exit(EX_CONFIG)


@dataclass(frozen=True)
class Findings:
    """One run's configuration and checks (in order); ``failed`` names the required checks that failed."""

    environment: str
    venue: str
    quick: bool
    config: list[ConfigItem]
    checks: list[Check]

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == FAIL and c.required]

    def document(self, duration_ms: float) -> dict:
        """The ``--json`` document."""
        return {
            "ok": not self.failed,
            "environment": self.environment,
            "venue": self.venue,
            "quick": self.quick,
            "config": [asdict(item) for item in self.config],
            "checks": [asdict(c) for c in self.checks],
            "failed": self.failed,
            "duration_ms": duration_ms,
        }

    def dependencies_line(self) -> str:
        """``--dependencies-only``: one line, the checks that passed, or the required ones that failed."""
        if not self.failed:
            return "doctor: dependencies ok: " + "; ".join(f"{c.name} {c.detail}" for c in self.checks if c.status == OK)
        return "doctor: FAILED: " + "; ".join(f"{c.name} {c.detail}" for c in self.checks if c.name in self.failed)


def _exec(argv: list[str]) -> None:
    """``-- COMMAND``: exec it (keeping the PID); one that cannot be run is one line with the
    shell's codes, 127 not found and 126 found but not executable, never execvp's traceback."""
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        code = 127 if isinstance(exc, (FileNotFoundError, NotADirectoryError)) else 126
        raise CommandError(f"cannot run {argv[0]}: {exc.strerror or exc}", returncode=code) from None


class Command(BaseCommand):
    help = "Check configuration and dependencies; exit 0 ok, 1 a required check failed, 78 configuration error."
    requires_system_checks: list = []  # report problems ourselves, one line each
    requires_migrations_checks = False

    def add_arguments(self, parser):
        parser.add_argument("--quick", action="store_true", help="skip migrations, indexes and the exchange (start-up)")
        parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
        parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                            help="wait up to SECONDS for a late PostgreSQL/Redis/RabbitMQ (back-off, one line per attempt)")
        parser.add_argument("--skip-dependencies", action="store_true",
                            help="leave out PostgreSQL, Redis, RabbitMQ and the cache (web start: readiness reports them)")
        parser.add_argument("--dependencies-only", action="store_true",
                            help="only PostgreSQL, Redis, RabbitMQ and the cache; print one summary line")
        parser.add_argument("--no-index-check", action="store_true",
                            help="with --quick: do not refuse an INVALID index (the migrate Job repairs it)")
        parser.add_argument("then", nargs="*", metavar="-- COMMAND",
                            help="after `--`: exec COMMAND when every required check passed (keeps the PID)")

    def handle(self, *args, **options):
        if options["skip_dependencies"] and options["dependencies_only"]:
            sys.stderr.write("doctor: --skip-dependencies and --dependencies-only exclude each other\n")
            sys.exit(2)
        if not (math.isfinite(options["wait"]) and options["wait"] >= 0):
            sys.stderr.write(f"doctor: --wait must be a number of seconds, 0 or more (got {options['wait']})\n")
            sys.exit(2)
        environment, venue, config = _read_configuration()
        started = time.monotonic()
        checks = run_checks(options["quick"], options["wait"], dependencies=not options["skip_dependencies"],
                            others=not options["dependencies_only"], index_check=not options["no_index_check"])
        findings = Findings(environment, venue, options["quick"], config, checks)
        if options["json"]:
            self.stdout.write(json.dumps(findings.document(round((time.monotonic() - started) * 1000, 1))))
        elif options["dependencies_only"]:
            self.stdout.write(findings.dependencies_line())
        else:
            self._write_table(findings)
        sys.stdout.flush()
        if findings.failed:
            sys.exit(EX_FAILED)
        if options["then"]:
            _exec(options["then"])

    def _write_table(self, findings: Findings) -> None:
        """The readable report: header, configuration table, checks table, one ``fix`` line per
        failed or warned check that has one, and the verdict line."""
        quick = " (quick)" if findings.quick else ""
        self.stdout.write(f"stopmonitor doctor: environment={findings.environment} venue={findings.venue}{quick}")
        self.stdout.write(_table([[i.name, i.source, i.value] for i in findings.config], ["SETTING", "FROM", "VALUE"]))
        self.stdout.write("")
        self.stdout.write(_table([[c.name, c.shown_status, c.detail] for c in findings.checks],
                                 ["CHECK", "STATUS", "DETAIL"]))
        for c in findings.checks:
            if c.fix and c.status in (FAIL, WARN):
                self.stdout.write(f"fix {c.name}: {c.fix}")
        self.stdout.write(f"doctor: {'ok' if not findings.failed else 'FAILED: ' + ', '.join(findings.failed)}")
