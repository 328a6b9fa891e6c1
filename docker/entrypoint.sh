#!/bin/sh
# Container entrypoint: `doctor --quick`, then exec the process named by the first argument.
#
#   web      gunicorn -c docker/gunicorn.conf.py config.wsgi:application   (the default CMD)
#   monitor  manage.py monitor_stops [--loop --interval N]
#   migrate  manage.py migrate --noinput
#   worker   celery -A config.celery:app worker
#   beat     celery -A config.celery:app beat (schedule file under /tmp)
#   backfill manage.py backfill_stop_price [...]
#   outbox   manage.py publish_outbox [--loop]
#   doctor   manage.py doctor [...]  (no --quick pre-run)
#   *        exec "$@" (e.g. `python manage.py shell`)
#
# doctor's exit status is passed through: 78 (EX_CONFIG) for a configuration error — one line on
# stderr naming every missing variable and its accepted spellings — and 1 when a required check
# fails (database or Redis unreachable, static manifest missing, ...). SKIP_DOCTOR=1 skips it
# (to get a shell in a broken environment). Nothing here writes to the filesystem.
set -eu

APP_DIR="${APP_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$APP_DIR"

cmd="${1:-web}"
if [ "$#" -gt 0 ]; then
    shift
fi

if [ "$cmd" != "doctor" ] && [ "${SKIP_DOCTOR:-0}" != "1" ]; then
    python manage.py doctor --quick || {
        rc=$?
        echo "entrypoint: doctor --quick exited $rc; not starting '$cmd'" >&2
        exit "$rc"
    }
fi

case "$cmd" in
    web)
        exec gunicorn -c docker/gunicorn.conf.py config.wsgi:application "$@" ;;
    monitor)
        exec python manage.py monitor_stops "$@" ;;
    migrate)
        exec python manage.py migrate --noinput "$@" ;;
    worker)
        exec celery -A config.celery:app worker --loglevel "${LOG_LEVEL:-INFO}" "$@" ;;
    beat)
        exec celery -A config.celery:app beat --loglevel "${LOG_LEVEL:-INFO}" \
            --schedule "${CELERY_BEAT_SCHEDULE_FILE:-/tmp/celerybeat-schedule}" "$@" ;;
    backfill)
        exec python manage.py backfill_stop_price "$@" ;;
    outbox)
        exec python manage.py publish_outbox "$@" ;;
    doctor)
        exec python manage.py doctor "$@" ;;
    *)
        exec "$cmd" "$@" ;;
esac
