"""Django settings, resolved from the environment by :mod:`config.env` (python-decouple).

No configuration at all gives the embedded default: development mode, a SQLite file
beside ``manage.py``, the replay exchange on recorded real prices. In staging/production
a missing value stops start-up with one line on stderr and exit status 78.
"""

import hashlib
import sys
from pathlib import Path

import dj_database_url
from decouple import config as decouple_config

from config.engine import EngineConfigError, resolve_engine
from config.env import EX_CONFIG, ConfigError, resolve
from config.secrets import secret

BASE_DIR = Path(__file__).resolve().parent.parent


def _lookup(name: str) -> str:
    return decouple_config(name, default="")


# lower case: not a setting, so no settings dump (celery report, the debug page) prints its repr
try:
    _config = resolve(_lookup, base_dir=str(BASE_DIR))
    ENGINE_CONFIG = resolve_engine(_lookup)
except (ConfigError, EngineConfigError) as err:  # one line, no traceback, EX_CONFIG
    sys.stderr.write(f"stopmonitor: {err}\n")
    sys.stderr.flush()
    raise SystemExit(EX_CONFIG) from None

ENVIRONMENT = _config.environment
DEBUG = _config.debug
SECRET_KEY = secret(_config.secret_key)  # repr '***' (config/secrets.py)
ALLOWED_HOSTS = _config.allowed_hosts
CSRF_TRUSTED_ORIGINS = _config.csrf_trusted_origins

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "api",
    "stopmonitor",
    "django_prometheus",
]

MIDDLEWARE = [
    # probes first: /health answers before host validation and the SSL redirect
    "api.health.HealthProbeMiddleware",
    # refusals before anything is read (control characters, bodies over API_MAX_BODY_BYTES, a token in the
    # query string), the request deadline, what a request committed, JSON for unhandled errors
    "api.middleware.RequestGuardMiddleware",
    # /metrics for Prometheus (pod IP, plain HTTP: like the probes, before host validation)
    "stopmonitor.metrics.MetricsEndpointMiddleware",
    # request counts and latencies for /metrics (probes and scrapes above are not counted)
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    # unapplied migrations: JSON 503 migrations_pending instead of a missing table's 500
    "api.health.MigrationsPendingMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # SECURE_SSL_REDIRECT: only requests that reached Traefik over http (X-Forwarded-Proto: http)
    "api.health.ForwardedHttpsRedirectMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

# a request body larger than this is refused (413) before it is read; the API's bodies are a few hundred bytes
API_MAX_BODY_BYTES = decouple_config("API_MAX_BODY_BYTES", default=64 * 1024, cast=int)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES
# s after its arrival a request may still start (take its database connection); later it is answered 503
# deadline_exceeded without running. docker/gunicorn.conf.py exports it for the web workers (0: no deadline)
API_REQUEST_DEADLINE_SECONDS = decouple_config("API_REQUEST_DEADLINE_SECONDS", default=0, cast=float)
# Django's error page and error reports hide every configured secret (config/reporting.py)
DEFAULT_EXCEPTION_REPORTER_FILTER = "config.reporting.SecretsExceptionReporterFilter"
CSRF_FAILURE_VIEW = "api.errors.csrf_failure"

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# Database: DATABASE_URL or RBS_PG_*. CONN_MAX_AGE=0: a connection is released when the request
# (or command) ends. In the web workers docker/gunicorn.conf.py sets DB_POOL_MAX_SIZE to
# worker_connections: each worker process then keeps a psycopg pool of at most that many
# connections (a request takes one at its first query and gives it back at its end), so a pod
# still holds at most workers x worker_connections connections, without one connection set-up
# (a PostgreSQL backend start, ~5 ms of server CPU) per request. Everything else (commands,
# Celery, tests) opens and closes its own connection. See docker/README.md.
DATABASES = {"default": dj_database_url.parse(_config.database_url, conn_max_age=0)}
DATABASES["default"]["PASSWORD"] = secret(DATABASES["default"].get("PASSWORD"))
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    _options.setdefault("connect_timeout", 5)
    # sessions start in UTC (what Django wants with USE_TZ): no SET TIME ZONE after each connect
    _options.setdefault("options", "-c TimeZone=UTC")
    # web workers (docker/gunicorn.conf.py exports it): a statement waits at most this long for a lock,
    # then fails with lock_not_available (the API answers 409 locked); commands keep PostgreSQL's default
    _lock_timeout_ms = decouple_config("DB_LOCK_TIMEOUT_MS", default=0, cast=int)
    if _lock_timeout_ms > 0:
        _options["options"] += f" -c lock_timeout={_lock_timeout_ms}"
    _pool_max_size = decouple_config("DB_POOL_MAX_SIZE", default=0, cast=int)
    if _pool_max_size > 0:
        _options["pool"] = {
            "min_size": min(2, _pool_max_size),
            "max_size": _pool_max_size,
            # s a request waits for a connection (all busy, or the database unreachable): then it is
            # answered 503 + Retry-After without running, and /health/ready answers 503 within the
            # readiness probe's 3 s (the pool keeps retrying in the background)
            "timeout": decouple_config("DB_POOL_TIMEOUT", default=2, cast=float),
            "max_idle": 300,  # s before a connection above min_size is closed
        }
        # a pooled connection that died (database restart, idle timeout) is replaced, not handed out
        DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    DATABASES["default"]["TEST"] = {"NAME": decouple_config("TEST_DATABASE_NAME", default="test_stopmonitor")}

# Cache: Redis when configured (shared by every pod: rate-limit bans, clock offset, filters);
# otherwise a file cache under /tmp, shared by the processes of one machine that use the same
# database (its throttle counters and exchange state belong to that database's users and venue:
# two checkouts or test databases on one machine do not see each other's).
if _config.redis_url:
    # short socket timeouts: an unreachable Redis costs a pass 1 s, then the process goes on from
    # its own memory (stopmonitor.exchange.state.CacheState); it never stops a close
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                          "LOCATION": secret(_config.redis_url),
                          "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}}
else:
    _db = DATABASES["default"]
    _db_key = hashlib.sha1(f"{_db.get('HOST')}:{_db.get('PORT')}/{_db.get('NAME')}".encode()).hexdigest()[:12]
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": decouple_config("CACHE_DIR", default=f"/tmp/stopmonitor-cache-{_db_key}"),
        }
    }

REDIS_URL = secret(_config.redis_url)
RABBITMQ_URL = secret(_config.rabbitmq_url)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Security outside development
if ENVIRONMENT != "development":
    # TLS ends at Traefik, which sets X-Forwarded-Proto; only it reaches the pods' port
    # (NetworkPolicy allow-ingress-to-backend), so the header is trusted
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # not Django's SECURE_SSL_REDIRECT (it would answer 301 to every request straight to a pod):
    # api.health.ForwardedHttpsRedirectMiddleware redirects what came to the ingress over http
    FORWARDED_HTTPS_REDIRECT = _config.secure_ssl_redirect
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = 3600
    SECURE_CONTENT_TYPE_NOSNIFF = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.auth.BearerTokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PARSER_CLASSES": ["api.parsers.StrictJSONParser"],
    "DEFAULT_THROTTLE_CLASSES": ["api.throttling.UserRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": decouple_config("API_USER_THROTTLE", default="600/minute")},
    "EXCEPTION_HANDLER": "api.errors.exception_handler",
    "COERCE_DECIMAL_TO_STRING": True,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "stopmonitor API",
    "DESCRIPTION": "Stop-loss monitor for Binance positions: operations, event history, executions, risk controls.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "api.views.no_nul_in_string_parameters"],
    "ENUM_NAME_OVERRIDES": {
        "OperationStatusEnum": "api.models.OperationStatus",
        "ExecutionStatusEnum": "api.models.ExecutionStatus",
    },
}

# The exchange (see stopmonitor.exchange.factory)
EXCHANGE_VENUE = _config.venue
BINANCE_API_KEY = secret(_config.binance_api_key)
BINANCE_API_SECRET = secret(_config.binance_api_secret)
BINANCE_TESTNET = _config.binance_testnet
BINANCE_API_URL = _config.binance_api_url
BINANCE_TIMEOUT_SECONDS = ENGINE_CONFIG["BINANCE_TIMEOUT_SECONDS"]
BINANCE_RECV_WINDOW_MS = ENGINE_CONFIG["BINANCE_RECV_WINDOW_MS"]
BINANCE_PRIVATE_KEY = secret(_config.binance_private_key)
BINANCE_PRIVATE_KEY_PASSPHRASE = secret(_config.binance_private_key_passphrase)
# Stream mode (monitor_stops --stream): WebSocket bases; empty = Binance's for the venue
BINANCE_STREAM_URL = decouple_config("BINANCE_STREAM_URL", default="")
BINANCE_WS_API_URL = decouple_config("BINANCE_WS_API_URL", default="")
STREAM = {
    "SILENCE_SECONDS": decouple_config("STREAM_SILENCE_SECONDS", default=10, cast=float),
    "HOLD_DOWN_SECONDS": decouple_config("STREAM_HOLD_DOWN_SECONDS", default=30, cast=float),
    "FALLBACK_INTERVAL_SECONDS": decouple_config("STREAM_FALLBACK_INTERVAL_SECONDS", default=1, cast=float),
    "WATCHED_POLL_SECONDS": decouple_config("STREAM_WATCHED_POLL_SECONDS", default=2, cast=float),
    "MAX_CONNECTION_AGE_SECONDS": decouple_config("STREAM_MAX_CONNECTION_AGE_SECONDS", default=23 * 3600, cast=float),
    "STREAMS_PER_CONNECTION": decouple_config("STREAM_STREAMS_PER_CONNECTION", default=1024, cast=int),
    "WORKERS": decouple_config("STREAM_WORKERS", default=4, cast=int),
    "RETRY_COOLDOWN_SECONDS": decouple_config("STREAM_RETRY_COOLDOWN_SECONDS", default=1, cast=float),
    "PROGRESS_FILE": decouple_config("STREAM_PROGRESS_FILE", default="/tmp/stopmonitor-stream-progress"),
    # server-side prepared statements on the stream's persistent connections (psycopg's prepare_threshold:
    # a query is prepared at its Nth execution; 0 = off, Django's default, needed behind a transaction pooler)
    "PREPARE_THRESHOLD": decouple_config("STREAM_PREPARE_THRESHOLD", default=5, cast=int),
}
# Per-tenant exchange accounts (stopmonitor.account_crypto): Fernet keys, comma-separated, first encrypts
ACCOUNT_ENCRYPTION_KEYS = secret(decouple_config("ACCOUNT_ENCRYPTION_KEYS", default=""))
REPLAY_DATA_DIR = decouple_config("REPLAY_DATA_DIR", default=str(BASE_DIR / "stopmonitor" / "data"))

# Engine knobs (invariants in ../shared/design/stop-execution.md)
# (read and checked together by config.engine: a bad combination exits 78 at start)
STOPMONITOR = {name: ENGINE_CONFIG[name] for name in (
    "QUOTE_MAX_AGE_SECONDS", "RECONCILE_AFTER_SECONDS", "NOT_FOUND_WINDOW_SECONDS", "CIRCUIT_BREAKER_THRESHOLD",
    "CIRCUIT_BREAKER_COOLDOWN_SECONDS", "FEE_DUST_TOLERANCE_PCT", "NOTIONAL_MARGIN_PCT", "ENGINE_LOCK_TIMEOUT_MS",
    "ENGINE_STATEMENT_TIMEOUT_MS")}
STOPMONITOR.update({
    # exchange-held protection (../shared/design/protection.md): at most one replacement of an
    # operation's resting stop per interval; an order placed less than the window ago and absent from
    # openOrders is "not visible yet", never re-armed
    "PROTECTION_MOVE_INTERVAL_SECONDS": decouple_config("PROTECTION_MOVE_INTERVAL_SECONDS", default=60, cast=int),
    "PROTECTION_VISIBILITY_SECONDS": decouple_config("PROTECTION_VISIBILITY_SECONDS", default=60, cast=int),
})

# Celery (RabbitMQ broker, Redis result backend)
CELERY_BROKER_URL = secret(_config.rabbitmq_url) or "memory://"
CELERY_RESULT_BACKEND = secret(_config.redis_url) or "cache+memory://"
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

# Logging: stdout only; JSON lines outside development. Nothing writes a log file.
LOG_LEVEL = decouple_config("LOG_LEVEL", default="INFO")
LOG_FORMAT = decouple_config("LOG_FORMAT", default="json" if ENVIRONMENT != "development" else "text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "filters": {"redact": {"()": "stopmonitor.logs.RedactSecretsFilter"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": LOG_FORMAT if LOG_FORMAT in ("json", "text") else "json",
            "filters": ["redact"],
        }
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "urllib3": {"level": "WARNING"},
    },
}
