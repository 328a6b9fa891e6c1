"""Resolve the service's configuration from environment variables, under both spellings.

The deployment provides most values under two names (``DATABASE_URL`` or the ``RBS_PG_*``
set, ``SECRET_KEY`` or ``RBS_SECRET_KEY``, …). This module is the only place that knows the
spellings. It is plain Python so tests can feed it a dict instead of ``os.environ``.

An empty variable counts as unset. In ``staging`` and ``production`` a missing required
value raises :class:`ConfigError` naming every missing variable with its accepted spellings;
``config.settings`` turns that into one line on stderr and exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote, urlsplit

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
    #: Ed25519 (or RSA) private key, PEM text (from BINANCE_PRIVATE_KEY or the file named by
    #: BINANCE_PRIVATE_KEY_FILE); with it the API secret is not needed (REST and WebSocket API)
    binance_private_key: str | None = None
    binance_private_key_passphrase: str | None = None


def _first(lookup: Lookup, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = (lookup(name) or "").strip()
        if value:
            return value
    return None


def _first_name(lookup: Lookup, names: tuple[str, ...]) -> str:
    """The spelling a value was read from (the first set), for messages."""
    return next((name for name in names if (lookup(name) or "").strip()), names[0])


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


DATABASE_SCHEMES = ("postgres", "postgresql", "pgsql", "sqlite")


def _port_problem(name: str, raw: str) -> str | None:
    """``None`` when ``raw`` is a TCP port (1-65535), else the problem naming ``name`` (value shown)."""
    if raw.isdigit() and 0 < int(raw) < 65536:
        return None
    return f"{name} (got {raw!r}: not a port number 1-65535)"


def _url_problem(name: str, url: str, schemes: tuple[str, ...]) -> str | None:
    """``None`` when ``url`` parses with one of ``schemes`` and a numeric port; the problem otherwise.

    Credentials are never repeated in the problem (only the scheme and the part that is wrong).
    """
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        return f"{name} (malformed: {exc}; special characters in the password must be %-encoded)"
    if parts.scheme not in schemes:
        shown = parts.scheme or "none"
        return f"{name} (scheme {shown!r} unknown; use {', '.join(s + '://' for s in schemes)})"
    if parts.scheme != "sqlite" and not (parts.hostname or "%2F" in url.upper()):
        return f"{name} (no host: {parts.scheme}://USER:PASSWORD@HOST:PORT/NAME)"
    if parts.scheme != "sqlite" and schemes == DATABASE_SCHEMES and not parts.path.strip("/"):
        return f"{name} (no database name after the host: {parts.scheme}://USER:PASSWORD@HOST:{port or 'PORT'}/NAME)"
    return None


def _database_url(lookup: Lookup, problems: list[str], required: bool, base_dir: str) -> str:
    url = _first(lookup, ("DATABASE_URL",))
    if url:
        problem = _url_problem("DATABASE_URL", url, DATABASE_SCHEMES)
        if problem:
            problems.append(problem)
            return ""
        return url
    parts = {name: _first(lookup, (name,)) for name in PG_PARTS}
    if any(parts.values()):
        missing = [n for n in PG_REQUIRED if not parts[n]]
        if missing:
            problems.append("DATABASE_URL (or " + ", ".join(missing) + " to complete RBS_PG_*)")
            return ""
        port = parts["RBS_PG_PORT"] or "5432"
        problem = _port_problem("RBS_PG_PORT", port)
        if problem:
            problems.append(problem)
            return ""
        user = quote(parts["RBS_PG_USER"], safe="")
        password = quote(parts["RBS_PG_PASSWORD"], safe="")
        # a socket directory (/var/run/postgresql) is %-encoded: libpq takes a host starting with /
        # as the folder of the server's Unix socket
        host = quote(parts["RBS_PG_HOST"], safe="")
        return f"postgres://{user}:{password}@{host}:{port}/{quote(parts['RBS_PG_DATABASE'], safe='')}"
    if required:
        problems.append("DATABASE_URL (or RBS_PG_DATABASE, RBS_PG_USER, RBS_PG_PASSWORD, RBS_PG_HOST, RBS_PG_PORT)")
        return ""
    return f"sqlite:///{base_dir}/db.sqlite3"


def resolve(lookup: Lookup, base_dir: str = ".") -> ServiceConfig:
    """Build the :class:`ServiceConfig` from ``lookup(name) -> str`` ('' when unset).

    Raises :class:`ConfigError` listing every problem at once (never only the first), in the
    order of the fields below. Defaults (development only): SQLite file ``<base_dir>/db.sqlite3``,
    an insecure development secret key, ``ALLOWED_HOSTS=localhost,127.0.0.1,[::1],testserver``
    and the ``replay`` venue (recorded real prices, no keys).
    """
    problems: list[str] = []
    environment = _environment(lookup)
    strict = environment != "development"
    debug = _bool(_first(lookup, ("DEBUG",)), not strict, "DEBUG", problems)
    secret_key = _secret_key(lookup, strict, problems)
    allowed_hosts = _allowed_hosts(lookup, strict, problems)
    database_url = _database_url(lookup, problems, strict, base_dir)
    redis_url, rabbitmq_url = _broker_urls(lookup, strict, problems)
    testnet = _bool(_first(lookup, ("BINANCE_TESTNET",)), environment != "production", "BINANCE_TESTNET", problems)
    venue = _venue(lookup, environment, testnet, problems)
    api_key, api_secret, private_key = _binance_keys(lookup, venue, problems)
    key_passphrase = _first(lookup, ("BINANCE_PRIVATE_KEY_PASSPHRASE", "RBS_BINANCE_PRIVATE_KEY_PASSPHRASE"))
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
        binance_private_key=private_key,
        binance_private_key_passphrase=key_passphrase,
    )


def _environment(lookup: Lookup) -> str:
    """``ENVIRONMENT`` lower-cased, ``development`` when unset. An unknown one raises
    :class:`ConfigError` alone: every other rule depends on the environment, and guessing one
    would report problems (a venue refused in production, ...) that are not there."""
    environment = (_first(lookup, ("ENVIRONMENT", "RBS_ENVIRONMENT")) or "development").lower()
    if environment not in ENVIRONMENTS:
        raise ConfigError([f"ENVIRONMENT (got {environment!r}; one of {', '.join(ENVIRONMENTS)})"])
    return environment


def _secret_key(lookup: Lookup, strict: bool, problems: list[str]) -> str:
    secret_key = _first(lookup, SPELLINGS["SECRET_KEY"])
    if secret_key:
        return secret_key
    if strict:
        problems.append("SECRET_KEY (or RBS_SECRET_KEY)")
    return "development-only-insecure-key-do-not-use-in-production"


def _allowed_hosts(lookup: Lookup, strict: bool, problems: list[str]) -> list[str]:
    hosts_raw = _first(lookup, ("ALLOWED_HOSTS", "RBS_ALLOWED_HOSTS"))
    if hosts_raw:
        return [h.strip() for h in hosts_raw.split(",") if h.strip()]
    if strict:
        problems.append("ALLOWED_HOSTS (or RBS_ALLOWED_HOSTS)")
        return []
    return ["localhost", "127.0.0.1", "[::1]", "testserver"]


def _broker_urls(lookup: Lookup, strict: bool, problems: list[str]) -> tuple[str | None, str | None]:
    """(Redis URL, RabbitMQ URL). Redis is required outside development: the exchange's
    rate-limit ban and clock offset must outlive a CronJob pod."""
    redis_url = _first(lookup, SPELLINGS["REDIS_URL"])
    if strict and not redis_url:
        problems.append("REDIS_URL (or RBS_REDIS_URL)")
    rabbitmq_url = _first(lookup, SPELLINGS["RABBITMQ_URL"])
    for names, url, schemes in ((SPELLINGS["REDIS_URL"], redis_url, ("redis", "rediss", "unix")),
                                (SPELLINGS["RABBITMQ_URL"], rabbitmq_url, ("amqp", "amqps"))):
        problem = url and _url_problem(_first_name(lookup, names), url, schemes)
        if problem:
            problems.append(problem)
    return redis_url, rabbitmq_url


def _venue(lookup: Lookup, environment: str, testnet: bool, problems: list[str]) -> str:
    """``EXCHANGE_VENUE``; unset: Binance (testnet when ``BINANCE_TESTNET``) outside development,
    ``replay`` in development. ``binance`` with ``BINANCE_TESTNET`` is the testnet; paper and
    replay are refused in production."""
    venue_raw = _first(lookup, ("EXCHANGE_VENUE", "RBS_EXCHANGE_VENUE"))
    if venue_raw:
        venue = venue_raw.lower()
        if venue not in VENUES:
            problems.append(f"EXCHANGE_VENUE (got {venue!r}; one of {', '.join(VENUES)})")
    elif environment != "development":
        venue = "binance-testnet" if testnet else "binance"
    else:
        venue = "replay"
    if venue == "binance" and testnet:
        venue = "binance-testnet"
    if venue in ("paper", "replay") and environment == "production":
        problems.append(f"EXCHANGE_VENUE ({venue} is not allowed in production)")
    return venue


def _binance_keys(lookup: Lookup, venue: str, problems: list[str]) -> tuple[str | None, str | None, str | None]:
    """(API key, HMAC secret, Ed25519 private key PEM); a Binance venue needs the key and
    the secret or the private key."""
    api_key = _first(lookup, ("BINANCE_API_KEY", "RBS_BINANCE_API_KEY"))
    api_secret = _first(lookup, ("BINANCE_API_SECRET", "RBS_BINANCE_API_SECRET"))
    private_key = _private_key(lookup, problems)
    if venue.startswith("binance"):
        if not api_key:
            problems.append("BINANCE_API_KEY (or RBS_BINANCE_API_KEY)")
        if not api_secret and not private_key:
            problems.append("BINANCE_API_SECRET (or RBS_BINANCE_API_SECRET)")  # or BINANCE_PRIVATE_KEY[_FILE]
    return api_key, api_secret, private_key


def _private_key(lookup: Lookup, problems: list[str]) -> str | None:
    """PEM text of the Binance private key: ``BINANCE_PRIVATE_KEY`` (the text) or
    ``BINANCE_PRIVATE_KEY_FILE`` (a path, e.g. a mounted Secret); RBS_ spellings too."""
    text = _first(lookup, ("BINANCE_PRIVATE_KEY", "RBS_BINANCE_PRIVATE_KEY"))
    path = _first(lookup, ("BINANCE_PRIVATE_KEY_FILE", "RBS_BINANCE_PRIVATE_KEY_FILE"))
    if text and path:
        problems.append("BINANCE_PRIVATE_KEY_FILE (set BINANCE_PRIVATE_KEY or the file, not both)")
        return text
    if path:
        try:
            with open(path, encoding="ascii") as fh:
                text = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"BINANCE_PRIVATE_KEY_FILE (cannot read {path}: {type(exc).__name__})")
            return None
    if text and "PRIVATE KEY-----" not in text:
        problems.append("BINANCE_PRIVATE_KEY (not a PEM private key)")
    return text or None


def check_settings_module(environ: dict[str, str]) -> str | None:
    """The one line to print when ``DJANGO_SETTINGS_MODULE`` names a module that does not exist
    (``None`` when it exists or is unset): checked by ``manage.py`` and ``config/wsgi.py`` before
    Django imports it, which would end in a ModuleNotFoundError traceback."""
    name = (environ.get("DJANGO_SETTINGS_MODULE") or "").strip()
    if not name:
        return None
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return (f"stopmonitor: configuration error: DJANGO_SETTINGS_MODULE={name!r} is not a module "
            "(unset it, or use config.settings)")
