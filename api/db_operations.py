"""Custom migration operations: append-only trigger, concurrent (self-repairing) index builds and drops, UUIDv7 in SQL."""

from __future__ import annotations

from datetime import timezone

from django.core.management.base import CommandError
from django.db import OperationalError, migrations

from stopmonitor.events import UUID7_SQL_FUNCTION

APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION stopmonitor_event_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'api_stopmonitorevent is append-only: % refused (invariant 8)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""


LOCK_TIMEOUT = "5s"  # how long a schema change may wait for its lock before it fails (and can be re-run)


def _with_lock_timeout(schema_editor, timeout: str, *statements: str) -> None:
    """Run ``statements`` each waiting at most ``timeout`` for its lock (then ``RESET lock_timeout``)."""
    schema_editor.execute(f"SET lock_timeout = '{timeout}'")
    for statement in statements:
        try:
            schema_editor.execute(statement)
        except OperationalError as exc:
            if not _lock_not_available(exc):
                raise
            raise CommandError(lock_timeout_message(schema_editor.connection, statement, timeout)) from None
    schema_editor.execute("RESET lock_timeout")


class _RowTrigger(migrations.operations.base.Operation):
    """A PostgreSQL ``BEFORE … FOR EACH ROW`` trigger and its function (other databases: nothing).

    Subclasses give ``function`` (name), ``function_sql`` (its CREATE), ``trigger`` (name),
    ``table``, ``events`` (e.g. ``"UPDATE OR DELETE"``) and ``summary`` (for ``describe``).
    """

    reduces_to_sql = True
    reversible = True
    function = function_sql = trigger = table = events = summary = ""

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        schema_editor.execute(self.function_sql, params=None)
        # re-runnable (a non-atomic migration that failed after this step runs it again) and never
        # queued for ever behind a long transaction on the table
        _with_lock_timeout(schema_editor, LOCK_TIMEOUT,
                           f'DROP TRIGGER IF EXISTS "{self.trigger}" ON "{self.table}"',
                           f'CREATE TRIGGER "{self.trigger}" BEFORE {self.events} ON "{self.table}" '
                           f"FOR EACH ROW EXECUTE FUNCTION {self.function}()")

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        schema_editor.execute(f'DROP TRIGGER IF EXISTS "{self.trigger}" ON "{self.table}"')
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {self.function}()")

    def describe(self):
        return f"{self.summary} (PostgreSQL trigger)"


class AppendOnlyTrigger(_RowTrigger):
    """On PostgreSQL, a row trigger that refuses UPDATE and DELETE on ``table``.

    TRUNCATE stays possible for the test runner's flush; it needs table ownership, which the
    application role should not have in production.

    Other databases rely on the ORM guard in ``api.models.StopMonitorEvent``.
    """

    function, function_sql, events = "stopmonitor_event_append_only", APPEND_ONLY_FUNCTION, "UPDATE OR DELETE"

    def __init__(self, table: str):
        self.table = table
        self.trigger = f"{table}_append_only"
        self.summary = f"Refuse UPDATE and DELETE on {table}"


KEEP_REFERENCED_FUNCTION = """
CREATE OR REPLACE FUNCTION stopmonitor_operation_keeps_its_events() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM api_stopmonitorevent WHERE operation_id = OLD.id) THEN
        RAISE EXCEPTION 'operation % has events: % refused (the event store keeps its operations, invariant 8)',
            OLD.id, TG_OP USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$ LANGUAGE plpgsql;
"""


class OperationKeepsItsEvents(_RowTrigger):
    """On PostgreSQL, a row trigger on ``api_operation`` that refuses to DELETE an operation, or
    change its id, while events refer to it: what the event's foreign key constraint enforced on
    that side, checked once per (rare) delete instead of once per appended event at commit.

    The other side — no event for an operation that does not exist — holds by construction: events
    are written only by ``stopmonitor.events`` for an operation row the writer has read (and
    locked) in the same transaction. Django's ``on_delete=PROTECT`` still guards ORM deletes.
    """

    function, function_sql = "stopmonitor_operation_keeps_its_events", KEEP_REFERENCED_FUNCTION
    trigger, table, events = "api_operation_keeps_its_events", "api_operation", "DELETE OR UPDATE OF id"
    summary = "Refuse DELETE of an operation that has events"


class _LockTimeout:
    """``lock_timeout`` (keyword) for an index operation: kept by ``deconstruct``."""

    def __init__(self, *args, lock_timeout: str = LOCK_TIMEOUT, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock_timeout = lock_timeout

    def deconstruct(self):
        name, args, kwargs = super().deconstruct()
        kwargs["lock_timeout"] = self.lock_timeout
        return name, args, kwargs


BLOCKERS_SQL = """
SELECT pid, state, EXTRACT(EPOCH FROM now() - xact_start), query_start, left(regexp_replace(query, '\\s+', ' ', 'g'), 80)
FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND datname = current_database() AND xact_start IS NOT NULL
ORDER BY xact_start LIMIT 3
"""


def lock_timeout_message(connection, what: str, timeout: str) -> str:
    """One line for ``what`` (a DDL statement) that gave up after ``timeout`` waiting for a lock: the
    oldest open transactions of the database, which hold it back (pid, state, transaction age, query
    start, query), and what to do. A CREATE INDEX CONCURRENTLY waits for the transactions that
    wrote to its table and for every one holding an older snapshot."""
    try:
        with connection.cursor() as cursor:
            cursor.execute(BLOCKERS_SQL)
            rows = cursor.fetchall()
    except Exception:  # noqa: BLE001 - the message is still useful without the sessions
        rows = []
    sessions = "; ".join(
        f"pid {pid} ({state}, transaction open {age:.1f} s, query started "
        f"{started.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ') if started else '?'}: {query!r})"
        for pid, state, age, started, query in rows
    ) or "no open transaction now (it has ended)"
    first = rows[0][0] if rows else "<pid>"
    return (f"{what} waited {timeout} for a lock and gave up; blocked by {sessions}. End it "
            f"(SELECT pg_terminate_backend({first})) or let it finish, then run migrate again: it repairs "
            f"what this step left (an INVALID index is dropped and rebuilt)")


def _lock_not_available(exc: Exception) -> bool:
    return getattr(exc.__cause__, "sqlstate", None) == "55P03"


class AddIndexConcurrentlyRepairing(_LockTimeout, migrations.AddIndex):
    """``AddIndex`` that on PostgreSQL builds ``CONCURRENTLY`` under a ``lock_timeout``.

    An index left INVALID by an earlier failed concurrent build is dropped (concurrently) and
    built again instead of being skipped; a valid one already present is kept. The migration
    using it must set ``atomic = False``. On SQLite it is a plain ``CREATE INDEX``.
    """

    @staticmethod
    def index_state(connection, name: str) -> str:
        """``"missing"``, ``"valid"`` or ``"invalid"`` for the index ``name`` (PostgreSQL)."""
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = %s AND pg_table_is_visible(c.oid)",
                [name],
            )
            row = cursor.fetchone()
        if row is None:
            return "missing"
        return "valid" if row[0] else "invalid"

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        connection = schema_editor.connection
        if connection.vendor != "postgresql":
            schema_editor.add_index(model, self.index)
            return
        if connection.in_atomic_block and not schema_editor.collect_sql:
            raise RuntimeError("CREATE INDEX CONCURRENTLY needs a non-atomic migration (atomic = False)")
        collecting = schema_editor.collect_sql
        state = "missing" if collecting else self.index_state(connection, self.index.name)
        schema_editor.execute(f"SET lock_timeout = '{self.lock_timeout}'")
        if state == "invalid":
            schema_editor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{self.index.name}"')
        if state != "valid":
            try:
                schema_editor.add_index(model, self.index, concurrently=True)
            except OperationalError as exc:
                if not _lock_not_available(exc):
                    raise
                # one line (migrate prints a CommandError without its traceback), naming the session
                raise CommandError(lock_timeout_message(
                    connection, f"CREATE INDEX CONCURRENTLY {self.index.name}", self.lock_timeout)) from None
        schema_editor.execute("RESET lock_timeout")

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        model = from_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor != "postgresql":
            schema_editor.remove_index(model, self.index)
            return
        _with_lock_timeout(schema_editor, self.lock_timeout, f'DROP INDEX CONCURRENTLY IF EXISTS "{self.index.name}"')

    def describe(self):
        return f"Create index {self.index.name} concurrently (repairing an INVALID one) on {self.model_name}"


class RemoveIndexConcurrently(_LockTimeout, migrations.RemoveIndex):
    """``RemoveIndex`` that on PostgreSQL drops ``CONCURRENTLY IF EXISTS`` under a ``lock_timeout``,
    so a large table keeps taking writes; backwards it builds the index again concurrently.
    The migration using it must set ``atomic = False``. On SQLite it is a plain ``DROP INDEX``.
    """

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        model = from_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor != "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
            return
        _with_lock_timeout(schema_editor, self.lock_timeout, f'DROP INDEX CONCURRENTLY IF EXISTS "{self.name}"')

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        index = to_state.models[app_label, self.model_name_lower].get_index_by_name(self.name)
        if schema_editor.connection.vendor != "postgresql":
            schema_editor.add_index(model, index)
            return
        schema_editor.execute(f"SET lock_timeout = '{self.lock_timeout}'")
        schema_editor.add_index(model, index, concurrently=True)
        schema_editor.execute("RESET lock_timeout")

    def describe(self):
        return f"Drop index {self.name} concurrently from {self.model_name}"



class DropIndexByNameConcurrently(migrations.operations.base.Operation):
    """Drops the index ``name`` of ``table`` (one Django created for a foreign key, say) without
    changing the migration state: ``CONCURRENTLY IF EXISTS`` under a ``lock_timeout`` on PostgreSQL,
    plain on SQLite. Backwards it builds ``name`` on ``columns`` again (concurrently on PostgreSQL).
    Pair it with a state-only ``AlterField(db_index=False)`` in ``SeparateDatabaseAndState`` where
    ``AlterField`` itself would drop and re-add (re-validate) a foreign key. Needs ``atomic = False``.
    """

    reversible = True

    def __init__(self, table: str, name: str, columns: list[str], lock_timeout: str = LOCK_TIMEOUT):
        self.table, self.name, self.columns, self.lock_timeout = table, name, columns, lock_timeout

    def deconstruct(self):
        return (self.__class__.__name__, [],
                {"table": self.table, "name": self.name, "columns": self.columns, "lock_timeout": self.lock_timeout})

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            schema_editor.execute(f'DROP INDEX IF EXISTS "{self.name}"')
            return
        _with_lock_timeout(schema_editor, self.lock_timeout, f'DROP INDEX CONCURRENTLY IF EXISTS "{self.name}"')

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        columns = ", ".join(f'"{c}"' for c in self.columns)
        if schema_editor.connection.vendor != "postgresql":
            schema_editor.execute(f'CREATE INDEX IF NOT EXISTS "{self.name}" ON "{self.table}" ({columns})')
            return
        _with_lock_timeout(schema_editor, self.lock_timeout,
                           f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{self.name}" ON "{self.table}" ({columns})')

    def describe(self):
        return f"Drop index {self.name} of {self.table} concurrently"


class DropForeignKeyConstraint(migrations.operations.base.Operation):
    """Drops the foreign key constraint ``name`` of ``table`` under a ``lock_timeout``
    (``DROP CONSTRAINT IF EXISTS``: re-runnable), without changing the migration state; pair it
    with a state-only ``AlterField(db_constraint=False)`` in ``SeparateDatabaseAndState``
    (``AlterField`` itself would wait for its lock with no limit). Backwards it adds
    ``definition`` again ``NOT VALID`` and then validates it, which does not block writes while
    the table is checked. PostgreSQL only (SQLite keeps the constraint in its table definition).
    Needs ``atomic = False``.
    """

    reversible = True

    def __init__(self, table: str, name: str, definition: str, lock_timeout: str = LOCK_TIMEOUT):
        self.table, self.name, self.definition, self.lock_timeout = table, name, definition, lock_timeout

    def deconstruct(self):
        return (self.__class__.__name__, [], {"table": self.table, "name": self.name, "definition": self.definition,
                                              "lock_timeout": self.lock_timeout})

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        _with_lock_timeout(schema_editor, self.lock_timeout,
                           f'ALTER TABLE "{self.table}" DROP CONSTRAINT IF EXISTS "{self.name}"')

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        _with_lock_timeout(schema_editor, self.lock_timeout,
                           f'ALTER TABLE "{self.table}" DROP CONSTRAINT IF EXISTS "{self.name}"',
                           f'ALTER TABLE "{self.table}" ADD CONSTRAINT "{self.name}" {self.definition} NOT VALID')
        schema_editor.execute(f'ALTER TABLE "{self.table}" VALIDATE CONSTRAINT "{self.name}"')

    def describe(self):
        return f"Drop constraint {self.name} of {self.table} (under a lock timeout)"

# RFC 9562 UUID version 7 in SQL (the function :data:`stopmonitor.events.UUID7_SQL_FUNCTION`), for events appended set-based (``append_many``): the first 48
# bits are the Unix time in milliseconds (clock_timestamp), then version 7 and random bits; the
# same layout as ``uuid6.uuid7`` (the model's default for events appended one by one). Time-ordered
# ids land at the right edge of the unique index instead of at random pages of it.
_CREATE_UUID7 = f"""
CREATE OR REPLACE FUNCTION {UUID7_SQL_FUNCTION}() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
  SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) PLACING
    substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) FROM 1 FOR 6),
    52, 1), 53, 1), 'hex')::uuid
$$"""


class CreateUUID7Function(migrations.operations.base.Operation):
    """Creates (backwards: drops) :data:`UUID7_SQL_FUNCTION` on PostgreSQL; nothing on SQLite."""

    reversible = True

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(_CREATE_UUID7)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f"DROP FUNCTION IF EXISTS {UUID7_SQL_FUNCTION}()")

    def describe(self):
        return f"Create SQL function {UUID7_SQL_FUNCTION}() (UUID version 7)"


NO_TRUNCATE_FUNCTION = """
CREATE OR REPLACE FUNCTION stopmonitor_event_no_truncate() RETURNS trigger AS $$
BEGIN
    -- a superuser (the test runner's flush, a restore drill's scratch copy) may; no other role,
    -- the owner included, truncates the event store by accident
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION '% is append-only: TRUNCATE refused (invariant 8)', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""


class NoTruncateTrigger(migrations.operations.base.Operation):
    """On PostgreSQL, a ``BEFORE TRUNCATE`` statement trigger on ``table`` refusing TRUNCATE to every
    role but a superuser (also when reached by ``TRUNCATE … CASCADE`` from another table). The
    runtime role has no TRUNCATE privilege at all (:mod:`stopmonitor.roles`); this stops the owner."""

    reduces_to_sql = True
    reversible = True

    def __init__(self, table: str):
        self.table = table
        self.trigger = f"{table}_no_truncate"

    def deconstruct(self):
        return self.__class__.__name__, [self.table], {}

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        schema_editor.execute(NO_TRUNCATE_FUNCTION, params=None)
        _with_lock_timeout(schema_editor, LOCK_TIMEOUT,
                           f'DROP TRIGGER IF EXISTS "{self.trigger}" ON "{self.table}"',
                           f'CREATE TRIGGER "{self.trigger}" BEFORE TRUNCATE ON "{self.table}" '
                           f"FOR EACH STATEMENT EXECUTE FUNCTION stopmonitor_event_no_truncate()")

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f'DROP TRIGGER IF EXISTS "{self.trigger}" ON "{self.table}"')

    def describe(self):
        return f"Refuse TRUNCATE on {self.table} (PostgreSQL trigger)"


KEEP_TENANT_FUNCTION = """
CREATE OR REPLACE FUNCTION stopmonitor_operation_keeps_its_tenant() RETURNS trigger AS $$
BEGIN
    IF NEW.client_id IS DISTINCT FROM OLD.client_id
       AND EXISTS (SELECT 1 FROM api_stopmonitorevent WHERE operation_id = OLD.id) THEN
        RAISE EXCEPTION 'operation % has events: its tenant cannot change (% to %)', OLD.id, OLD.client_id,
            NEW.client_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
"""


class OperationKeepsItsTenant(_RowTrigger):
    """On PostgreSQL, a row trigger on ``api_operation`` refusing to change ``client_id`` (the tenant)
    of an operation that has events: its events carry the tenant and the feed serves them by it."""

    function, function_sql = "stopmonitor_operation_keeps_its_tenant", KEEP_TENANT_FUNCTION
    trigger, table, events = "api_operation_keeps_its_tenant", "api_operation", "UPDATE OF client_id"
    summary = "Refuse changing the tenant of an operation that has events"
