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

``docker/entrypoint.sh`` runs ``doctor --quick`` before every process. The module imports only
the standard library at import time; Django's database and cache machinery is loaded inside
the checks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlencode, urlparse

from django.core.management.base import BaseCommand

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
    line = (str(text).strip().splitlines() or [""])[0]
    for secret in secrets:
        if secret:
            line = line.replace(secret, "***")
    return line[:limit]


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
        return Check("database", OK, version)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return Check(
            "database",
            FAIL,
            f"{type(exc).__name__}: {_one_line(exc, secrets)}",
            "check DATABASE_URL / RBS_PG_* (host, port, user, password) and that PostgreSQL is up and "
            "reachable on 5432 (NetworkPolicy allow-backend-to-datastores)",
        )


def check_migrations(secrets: list[str]) -> Check:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except Exception as exc:  # noqa: BLE001
        return Check("migrations", FAIL, f"{type(exc).__name__}: {_one_line(exc, secrets)}", "fix the database check first")
    if plan:
        names = ", ".join(f"{m.app_label}.{m.name}" for m, _ in plan[:3])
        more = f" (+{len(plan) - 3} more)" if len(plan) > 3 else ""
        return Check(
            "migrations",
            FAIL,
            f"{len(plan)} unapplied: {names}{more}",
            "run: python manage.py migrate (docker: `entrypoint.sh migrate`; k8s: the migrate Job)",
        )
    return Check("migrations", OK, "all applied")


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
            "an interrupted CREATE INDEX CONCURRENTLY: run REINDEX INDEX CONCURRENTLY <name> "
            "(or DROP INDEX CONCURRENTLY <name> and re-run migrate)",
        )
    return Check("invalid_indexes", OK, "none")


def _tcp(url: str, default_port: int, timeout: float = 2.0) -> None:
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname or "localhost", parsed.port or default_port), timeout=timeout):
        pass


def check_tcp(name: str, url: str | None, default_port: int, fix: str) -> Check:
    if not url:
        return Check(name, SKIP, "not configured", required=False)
    try:
        _tcp(url, default_port)
        return Check(name, OK, _safe_url(url))
    except OSError as exc:
        return Check(name, FAIL, f"{_safe_url(url)}: {type(exc).__name__}: {exc.strerror or exc}", fix)


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
        "run collectstatic at build time (docker/Dockerfile does: ENVIRONMENT=development manage.py collectstatic)",
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


def check_binance(secrets: list[str]) -> list[Check]:
    """Reachability and clock offset (``/api/v3/time``), then whether the keys can trade."""
    from django.conf import settings

    venue = str(settings.EXCHANGE_VENUE)
    if not venue.startswith("binance"):
        return [Check("binance", SKIP, f"venue {venue}", required=False)]
    base = (settings.BINANCE_API_URL or (BINANCE_TESTNET if settings.BINANCE_TESTNET else BINANCE_MAINNET)).rstrip("/")
    base = base.removesuffix("/api")  # python-binance's REST base (…/api) is accepted too, as the adapter does
    network = "testnet" if settings.BINANCE_TESTNET else "mainnet"
    checks: list[Check] = []
    try:
        sent = time.time()
        status, body = _http_json(f"{base}/api/v3/time")
        received = time.time()
        if status != 200 or "serverTime" not in body:
            raise RuntimeError(f"HTTP {status}")
        offset_ms = int(body["serverTime"] - (sent + received) / 2 * 1000)
    except Exception as exc:  # noqa: BLE001
        return [
            Check(
                "binance",
                FAIL,
                f"{base} ({network}): {type(exc).__name__}: {_one_line(exc, secrets)}",
                "allow HTTPS egress (NetworkPolicy allow-https-egress) or fix BINANCE_API_URL",
            )
        ]
    checks.append(Check("binance", OK, f"{base} ({network}) reachable"))
    if abs(offset_ms) > CLOCK_OFFSET_WARN_MS:
        checks.append(
            Check("binance_clock", WARN, f"offset {offset_ms} ms", "sync the node clock (NTP); signed calls may be refused", False)
        )
    else:
        checks.append(Check("binance_clock", OK, f"offset {offset_ms} ms", required=False))

    key, secret = settings.BINANCE_API_KEY or "", settings.BINANCE_API_SECRET or ""
    query = urlencode({"timestamp": int(time.time() * 1000 + offset_ms), "recvWindow": 5000, "omitZeroBalances": "true"})
    signature = hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()
    try:
        status, body = _http_json(f"{base}/api/v3/account?{query}&signature={signature}", {"X-MBX-APIKEY": key})
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("binance_keys", FAIL, f"{type(exc).__name__}: {_one_line(exc, secrets)}", "retry; the exchange did not answer"))
        return checks
    if status == 200:
        can_trade = bool(body.get("canTrade"))
        checks.append(
            Check(
                "binance_keys",
                OK if can_trade else FAIL,
                f"{network} keys accepted; canTrade={str(can_trade).lower()}",
                "" if can_trade else "enable Spot trading for this API key",
            )
        )
    else:
        code, msg = body.get("code"), body.get("msg", "")
        checks.append(
            Check(
                "binance_keys",
                FAIL,
                f"HTTP {status} code {code}: {_one_line(msg, secrets)}",
                f"the keys are not valid for {network} ({base}): check BINANCE_API_KEY/SECRET, BINANCE_TESTNET "
                "and the key's IP whitelist",
            )
        )
    return checks


def run_checks(quick: bool) -> list[Check]:
    from django.conf import settings

    secrets = _secrets()
    checks = [check_database(secrets)]
    db_ok = checks[0].status == OK
    if not quick:
        if db_ok:
            checks.append(check_migrations(secrets))
            checks.append(check_invalid_indexes(secrets))
        else:
            checks.append(Check("migrations", SKIP, "database unreachable", required=False))
    redis = check_tcp("redis", settings.REDIS_URL, 6379, "check REDIS_URL (or RBS_REDIS_URL) and that Redis listens on 6379")
    rabbit = check_tcp(
        "rabbitmq", settings.RABBITMQ_URL, 5672, "check RABBITMQ_URL (or RBS_RABBITMQ_URL) and that RabbitMQ listens on 5672"
    )
    checks += [redis, rabbit]
    redis_ok = None if redis.status == SKIP else redis.status == OK
    checks.append(check_cache(secrets, redis_ok))
    file_cache = "filebased" in settings.CACHES["default"]["BACKEND"].lower()
    checks.append(check_tmp_writable(file_cache))
    checks.append(check_working_dir())
    checks.append(check_static())
    if quick:
        checks.append(Check("binance", SKIP, "--quick", required=False))
    else:
        checks.extend(check_binance(secrets))
    return checks


# --------------------------------------------------------------------------- command


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    widths[-1] = 0  # the last column is not padded
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


class Command(BaseCommand):
    help = "Check configuration and dependencies; exit 0 ok, 1 a required check failed, 78 configuration error."
    requires_system_checks: list = []  # report problems ourselves, one line each
    requires_migrations_checks = False

    def add_arguments(self, parser):
        parser.add_argument("--quick", action="store_true", help="skip migrations, indexes and the exchange (start-up)")
        parser.add_argument("--json", action="store_true", help="one JSON document on stdout")

    def handle(self, *args, **options):
        quick, as_json = options["quick"], options["json"]
        try:
            from django.conf import settings

            environment = settings.ENVIRONMENT
            venue = settings.EXCHANGE_VENUE
            config = config_summary()
        except Exception as exc:  # noqa: BLE001 - a configuration the settings module let through
            sys.stderr.write(f"stopmonitor: configuration error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n")
            sys.stderr.flush()
            sys.exit(EX_CONFIG)

        started = time.monotonic()
        checks = run_checks(quick)
        failed = [c.name for c in checks if c.status == FAIL and c.required]
        ok = not failed
        if as_json:
            document = {
                "ok": ok,
                "environment": environment,
                "venue": venue,
                "quick": quick,
                "config": [asdict(item) for item in config],
                "checks": [asdict(c) for c in checks],
                "failed": failed,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            }
            self.stdout.write(json.dumps(document))
        else:
            self.stdout.write(f"stopmonitor doctor: environment={environment} venue={venue}{' (quick)' if quick else ''}")
            self.stdout.write(
                _table([[i.name, i.source, i.value] for i in config], ["SETTING", "FROM", "VALUE"])
            )
            self.stdout.write("")
            self.stdout.write(
                _table(
                    [[c.name, c.status.upper() if c.required or c.status != FAIL else "WARN", c.detail] for c in checks],
                    ["CHECK", "STATUS", "DETAIL"],
                )
            )
            for c in checks:
                if c.fix and c.status in (FAIL, WARN):
                    self.stdout.write(f"fix {c.name}: {c.fix}")
            self.stdout.write(f"doctor: {'ok' if ok else 'FAILED: ' + ', '.join(failed)}")
        sys.stdout.flush()
        if not ok:
            sys.exit(EX_FAILED)
