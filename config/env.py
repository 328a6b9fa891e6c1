"""Resolve the service's configuration from environment variables, under both spellings.

The deployment provides most values under two names (``DATABASE_URL`` or the ``RBS_PG_*``
set, ``SECRET_KEY`` or ``RBS_SECRET_KEY``, …). This module is the only place that knows the
spellings. It is plain Python so tests can feed it a dict instead of ``os.environ``.

An empty variable counts as unset. In ``staging`` and ``production`` a missing required
value raises :class:`ConfigError` naming every missing variable with its accepted spellings;
``config.settings`` turns that into one line on stderr and exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote

EX_CONFIG = 78
ENVIRONMENTS = ("development", "staging", "production")
VENUES = ("binance", "binance-testnet", "paper", "replay")

# name of a value -> the spellings accepted for it, first wins
SPELLINGS: dict[str, tuple[str, ...]] = {
    "SECRET_KEY": ("SECRET_KEY", "RBS_SECRET_KEY"),
    "REDIS_URL": ("REDIS_URL", "RBS_REDIS_URL"),
    "RABBITMQ_URL": ("RABBITMQ_URL", "RBS_RABBITMQ_URL"),
}
PG_PARTS = ("RBS_PG_DATABASE", "RBS_PG_USER", "RBS_PG_PASSWORD", "RBS_PG_HOST", "RBS_PG_PORT")
PG_REQUIRED = ("RBS_PG_DATABASE", "RBS_PG_USER", "RBS_PG_PASSWORD", "RBS_PG_HOST")

Lookup = Callable[[str], str]


class ConfigError(Exception):
    """Required configuration is missing or invalid.

    ``problems`` is a list of human-readable items, e.g.
    ``"SECRET_KEY (or RBS_SECRET_KEY)"``; ``str(err)`` is the one line printed at start-up.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("configuration error: missing or invalid: " + "; ".join(problems))


@dataclass(frozen=True)
class ServiceConfig:
    """The resolved configuration (strings and booleans, no secrets logged)."""

    environment: str
    debug: bool
    secret_key: str
    allowed_hosts: list[str]
    database_url: str
    redis_url: str | None
    rabbitmq_url: str | None
    venue: str
    binance_api_key: str | None
    binance_api_secret: str | None
    binance_testnet: bool
    binance_api_url: str | None
    csrf_trusted_origins: list[str] = field(default_factory=list)
    secure_ssl_redirect: bool = False


def _first(lookup: Lookup, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = (lookup(name) or "").strip()
        if value:
            return value
    return None


def _bool(raw: str | None, default: bool, name: str, problems: list[str]) -> bool:
    if raw is None:
        return default
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    problems.append(f"{name} (not a boolean: use true or false)")
    return default


def _database_url(lookup: Lookup, problems: list[str], required: bool, base_dir: str) -> str:
    url = _first(lookup, ("DATABASE_URL",))
    if url:
        return url
    parts = {name: _first(lookup, (name,)) for name in PG_PARTS}
    if any(parts.values()):
        missing = [n for n in PG_REQUIRED if not parts[n]]
        if missing:
            problems.append("DATABASE_URL (or " + ", ".join(missing) + " to complete RBS_PG_*)")
            return ""
        user = quote(parts["RBS_PG_USER"], safe="")
        password = quote(parts["RBS_PG_PASSWORD"], safe="")
        port = parts["RBS_PG_PORT"] or "5432"
        return (
            f"postgres://{user}:{password}@{parts['RBS_PG_HOST']}:{port}/"
            f"{quote(parts['RBS_PG_DATABASE'], safe='')}"
        )
    if required:
        problems.append("DATABASE_URL (or RBS_PG_DATABASE, RBS_PG_USER, RBS_PG_PASSWORD, RBS_PG_HOST, RBS_PG_PORT)")
        return ""
    return f"sqlite:///{base_dir}/db.sqlite3"


def resolve(lookup: Lookup, base_dir: str = ".") -> ServiceConfig:
    """Build the :class:`ServiceConfig` from ``lookup(name) -> str`` ('' when unset).

    Raises :class:`ConfigError` listing every problem at once (never only the first).
    Defaults (development only): SQLite file ``<base_dir>/db.sqlite3``, an insecure
    development secret key, ``ALLOWED_HOSTS=localhost,127.0.0.1,[::1],testserver`` and the
    ``replay`` venue (recorded real prices, no keys).
    """
    problems: list[str] = []
    environment = (_first(lookup, ("ENVIRONMENT", "RBS_ENVIRONMENT")) or "development").lower()
    if environment not in ENVIRONMENTS:
        problems.append(f"ENVIRONMENT (got {environment!r}; one of {', '.join(ENVIRONMENTS)})")
        environment = "production"  # the strictest reading of a typo
    strict = environment != "development"

    debug = _bool(_first(lookup, ("DEBUG",)), not strict, "DEBUG", problems)

    secret_key = _first(lookup, SPELLINGS["SECRET_KEY"])
    if not secret_key:
        if strict:
            problems.append("SECRET_KEY (or RBS_SECRET_KEY)")
        secret_key = "development-only-insecure-key-do-not-use-in-production"

    hosts_raw = _first(lookup, ("ALLOWED_HOSTS", "RBS_ALLOWED_HOSTS"))
    if hosts_raw:
        allowed_hosts = [h.strip() for h in hosts_raw.split(",") if h.strip()]
    elif strict:
        problems.append("ALLOWED_HOSTS (or RBS_ALLOWED_HOSTS)")
        allowed_hosts = []
    else:
        allowed_hosts = ["localhost", "127.0.0.1", "[::1]", "testserver"]

    database_url = _database_url(lookup, problems, strict, base_dir)

    redis_url = _first(lookup, SPELLINGS["REDIS_URL"])
    if strict and not redis_url:
        # the exchange's rate-limit ban and clock offset must outlive a CronJob pod
        problems.append("REDIS_URL (or RBS_REDIS_URL)")
    rabbitmq_url = _first(lookup, SPELLINGS["RABBITMQ_URL"])

    testnet = _bool(_first(lookup, ("BINANCE_TESTNET",)), environment != "production", "BINANCE_TESTNET", problems)
    venue_raw = _first(lookup, ("EXCHANGE_VENUE", "RBS_EXCHANGE_VENUE"))
    if venue_raw:
        venue = venue_raw.lower()
        if venue not in VENUES:
            problems.append(f"EXCHANGE_VENUE (got {venue!r}; one of {', '.join(VENUES)})")
    elif strict:
        venue = "binance-testnet" if testnet else "binance"
    else:
        venue = "replay"
    if venue == "binance" and testnet:
        venue = "binance-testnet"
    if strict and venue in ("paper", "replay") and environment == "production":
        problems.append(f"EXCHANGE_VENUE ({venue} is not allowed in production)")

    api_key = _first(lookup, ("BINANCE_API_KEY", "RBS_BINANCE_API_KEY"))
    api_secret = _first(lookup, ("BINANCE_API_SECRET", "RBS_BINANCE_API_SECRET"))
    if venue.startswith("binance"):
        if not api_key:
            problems.append("BINANCE_API_KEY (or RBS_BINANCE_API_KEY)")
        if not api_secret:
            problems.append("BINANCE_API_SECRET (or RBS_BINANCE_API_SECRET)")

    origins_raw = _first(lookup, ("CSRF_TRUSTED_ORIGINS",))
    origins = [o.strip() for o in origins_raw.split(",")] if origins_raw else []
    ssl_redirect = _bool(_first(lookup, ("SECURE_SSL_REDIRECT",)), strict, "SECURE_SSL_REDIRECT", problems)

    if problems:
        raise ConfigError(problems)
    return ServiceConfig(
        environment=environment,
        debug=debug,
        secret_key=secret_key,
        allowed_hosts=allowed_hosts,
        database_url=database_url,
        redis_url=redis_url,
        rabbitmq_url=rabbitmq_url,
        venue=venue,
        binance_api_key=api_key,
        binance_api_secret=api_secret,
        binance_testnet=testnet,
        binance_api_url=_first(lookup, ("BINANCE_API_URL", "RBS_BINANCE_API_URL")),
        csrf_trusted_origins=origins,
        secure_ssl_redirect=ssl_redirect,
    )
