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

from config.env import EX_CONFIG, ConfigError, resolve

BASE_DIR = Path(__file__).resolve().parent.parent


def _lookup(name: str) -> str:
    return decouple_config(name, default="")


try:
    CONFIG = resolve(_lookup, base_dir=str(BASE_DIR))
except ConfigError as err:  # one line, no traceback, EX_CONFIG
    sys.stderr.write(f"stopmonitor: {err}\n")
    sys.stderr.flush()
    raise SystemExit(EX_CONFIG) from None

ENVIRONMENT = CONFIG.environment
DEBUG = CONFIG.debug
SECRET_KEY = CONFIG.secret_key
ALLOWED_HOSTS = CONFIG.allowed_hosts
CSRF_TRUSTED_ORIGINS = CONFIG.csrf_trusted_origins

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
    # /metrics for Prometheus (pod IP, plain HTTP: like the probes, before host validation)
    "stopmonitor.metrics.MetricsEndpointMiddleware",
    # request counts and latencies for /metrics (probes and scrapes above are not counted)
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

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
DATABASES = {"default": dj_database_url.parse(CONFIG.database_url, conn_max_age=0)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    _options.setdefault("connect_timeout", 5)
    # sessions start in UTC (what Django wants with USE_TZ): no SET TIME ZONE after each connect
    _options.setdefault("options", "-c TimeZone=UTC")
    _pool_max_size = decouple_config("DB_POOL_MAX_SIZE", default=0, cast=int)
    if _pool_max_size > 0:
        _options["pool"] = {
            "min_size": min(2, _pool_max_size),
            "max_size": _pool_max_size,
            # s a request waits for a connection: only while the pool grows (a few ms), or when the
            # database cannot be reached; then the request fails and /health/ready answers 503
            # within the readiness probe's 3 s (the pool keeps retrying in the background)
            "timeout": 2,
            "max_idle": 300,  # s before a connection above min_size is closed
        }
        # a pooled connection that died (database restart, idle timeout) is replaced, not handed out
        DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    DATABASES["default"]["TEST"] = {"NAME": decouple_config("TEST_DATABASE_NAME", default="test_stopmonitor")}

# Cache: Redis when configured (shared by every pod: rate-limit bans, clock offset, filters);
# otherwise a file cache under /tmp, shared by the processes of one machine that use the same
# database (its throttle counters and exchange state belong to that database's users and venue:
# two checkouts or test databases on one machine do not see each other's).
if CONFIG.redis_url:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CONFIG.redis_url}}
else:
    _db = DATABASES["default"]
    _db_key = hashlib.sha1(f"{_db.get('HOST')}:{_db.get('PORT')}/{_db.get('NAME')}".encode()).hexdigest()[:12]
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": decouple_config("CACHE_DIR", default=f"/tmp/stopmonitor-cache-{_db_key}"),
        }
    }

REDIS_URL = CONFIG.redis_url
RABBITMQ_URL = CONFIG.rabbitmq_url

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
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = CONFIG.secure_ssl_redirect
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
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
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
    "ENUM_NAME_OVERRIDES": {
        "OperationStatusEnum": "api.models.OperationStatus",
        "ExecutionStatusEnum": "api.models.ExecutionStatus",
    },
}

# The exchange (see stopmonitor.exchange.factory)
EXCHANGE_VENUE = CONFIG.venue
BINANCE_API_KEY = CONFIG.binance_api_key
BINANCE_API_SECRET = CONFIG.binance_api_secret
BINANCE_TESTNET = CONFIG.binance_testnet
BINANCE_API_URL = CONFIG.binance_api_url
BINANCE_TIMEOUT_SECONDS = decouple_config("BINANCE_TIMEOUT_SECONDS", default=10, cast=int)
REPLAY_DATA_DIR = decouple_config("REPLAY_DATA_DIR", default=str(BASE_DIR / "stopmonitor" / "data"))

# Engine knobs (invariants in ../shared/design/stop-execution.md)
STOPMONITOR = {
    "QUOTE_MAX_AGE_SECONDS": decouple_config("QUOTE_MAX_AGE_SECONDS", default=10, cast=int),
    "RECONCILE_AFTER_SECONDS": decouple_config("RECONCILE_AFTER_SECONDS", default=30, cast=int),
    "CIRCUIT_BREAKER_THRESHOLD": decouple_config("CIRCUIT_BREAKER_THRESHOLD", default=3, cast=int),
    "CIRCUIT_BREAKER_COOLDOWN_SECONDS": decouple_config("CIRCUIT_BREAKER_COOLDOWN_SECONDS", default=300, cast=int),
}

# Celery (RabbitMQ broker, Redis result backend)
CELERY_BROKER_URL = CONFIG.rabbitmq_url or "memory://"
CELERY_RESULT_BACKEND = CONFIG.redis_url or "cache+memory://"
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
