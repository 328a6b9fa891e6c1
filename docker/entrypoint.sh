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
# stderr naming every missing or malformed variable — and 1 when a required check fails (a
# dependency still unreachable after the wait, a wrong password, a missing module, the static
# manifest, an INVALID index). SKIP_DOCTOR=1 skips it (to get a shell in a broken environment).
# Nothing here writes to the filesystem.
set -eu

APP_DIR="${APP_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$APP_DIR"

cmd="${1:-web}"
if [ "$#" -gt 0 ]; then
    shift
fi

# A dependency that is late (PostgreSQL/Redis/RabbitMQ refusing connections, not resolvable yet,
# starting up) is waited for, DEPENDENCY_WAIT_SECONDS at most (default 300), with back-off and one
# log line per attempt naming host:port and the cause; a configuration error stays immediate
# (one line, exit 78). The web process starts at once after the other checks: its /health answers
# 200 (liveness) and /health/ready 503 (readiness) while a background doctor logs the wait.
# Every other process is exec'd by doctor itself once the dependencies answer (the PID stays the
# same: the outbox relay's exec liveness probe watches PID 1 while it waits).
wait="${DEPENDENCY_WAIT_SECONDS:-300}"
doctor() {
    if [ "$cmd" = "doctor" ] || [ "${SKIP_DOCTOR:-0}" = "1" ]; then
        return 0
    fi
    python manage.py doctor --quick "$@" || {
        rc=$?
        echo "entrypoint: doctor --quick exited $rc; not starting '$cmd'" >&2
        exit "$rc"
    }
}
then_exec() {
    # `doctor --quick --wait N -- COMMAND...`: doctor execs COMMAND when its checks pass
    if [ "$cmd" = "doctor" ] || [ "${SKIP_DOCTOR:-0}" = "1" ]; then
        exec "$@"
    fi
    exec python manage.py doctor --quick --wait "$wait" $doctor_flags -- "$@"
}
doctor_flags=

case "$cmd" in
    web)
        doctor --skip-dependencies
        if [ "${SKIP_DOCTOR:-0}" != "1" ]; then
            python manage.py doctor --quick --dependencies-only --wait "$wait" &
        fi
        exec gunicorn -c docker/gunicorn.conf.py config.wsgi:application "$@" ;;
    monitor)
        then_exec python manage.py monitor_stops "$@" ;;
    migrate)
        doctor_flags=--no-index-check  # migrate is what repairs an INVALID index
        then_exec python manage.py migrate --noinput "$@" ;;
    worker)
        then_exec celery -A config.celery:app worker --loglevel "${LOG_LEVEL:-INFO}" "$@" ;;
    beat)
        then_exec celery -A config.celery:app beat --loglevel "${LOG_LEVEL:-INFO}" \
            --schedule "${CELERY_BEAT_SCHEDULE_FILE:-/tmp/celerybeat-schedule}" "$@" ;;
    backfill)
        then_exec python manage.py backfill_stop_price "$@" ;;
    outbox)
        then_exec python manage.py publish_outbox "$@" ;;
    doctor)
        exec python manage.py doctor "$@" ;;
    *)
        then_exec "$cmd" "$@" ;;
esac
