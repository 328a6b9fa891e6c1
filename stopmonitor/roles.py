"""Database roles: the owner (migrations) and the runtime role (web, monitor, relay, backfill, jobs) — one policy.

The **owner** role owns every table, sequence and function of the schema and is the only one that
runs DDL (the migrate Job). The **runtime** role the processes connect as owns nothing and gets,
per table, only the statements the code runs (:data:`TABLE_PRIVILEGES`; everything else
:data:`DEFAULT_PRIVILEGES`): on the event store ``SELECT, INSERT`` only, so no process can
``UPDATE``, ``DELETE`` or ``TRUNCATE`` an event, drop or disable its triggers, replace their
functions or drop the table (those need ownership). Neither role is a superuser.

:func:`setup` applies the policy and can run again at any time (the migrate Job runs it after
``migrate``, as the owner); :func:`runtime_findings` is what ``doctor`` reports for the role a
process connects as.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EVENTS_TABLE = "api_stopmonitorevent"
# table → the privileges the runtime role gets on it; other tables get DEFAULT_PRIVILEGES
TABLE_PRIVILEGES = {
    EVENTS_TABLE: ("SELECT", "INSERT"),  # invariant 8: append-only
    "api_outbox": ("SELECT", "INSERT", "UPDATE"),  # the relay marks rows published; never deletes one
    "django_migrations": ("SELECT",),  # doctor and readiness read it; only the owner migrates
}
DEFAULT_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _ident(name: str) -> str:
    """A role name checked against a plain lowercase identifier (never quoted user input in SQL)."""
    if not _NAME.match(name):
        raise ValueError(f"role name {name!r}: use lowercase letters, digits and _ (at most 63)")
    return name


@dataclass(frozen=True)
class Step:
    """One statement :func:`setup` ran (``sql`` without any password)."""

    sql: str


def setup(cursor, *, owner: str, runtime: str, create: bool = False, owner_password: str | None = None,
          runtime_password: str | None = None) -> list[Step]:
    """Apply the role policy on the current database of ``cursor`` (psycopg/Django cursor); idempotent.

    ``create`` (needs a role with CREATEROLE, e.g. the cluster's bootstrap superuser): create the
    roles when missing (LOGIN, NOSUPERUSER, NOCREATEDB, NOCREATEROLE, NOBYPASSRLS), set the given
    passwords, give the owner CREATE on the schema and take CREATE away from everyone else, and
    transfer every table, sequence, view and function of the schema to the owner. Always (as the
    owner or a superuser): revoke everything from the runtime role and grant the policy, and set the
    owner's default privileges so tables a later migration creates get :data:`DEFAULT_PRIVILEGES`
    (the migrate Job re-runs this after ``migrate``, which narrows new special tables again).

    Returns the statements run. Raises the database's error (e.g. permission denied) unchanged.
    """
    owner, runtime = _ident(owner), _ident(runtime)
    steps: list[Step] = []

    def run(sql: str, params=None, shown: str | None = None):
        cursor.execute(sql, params)
        steps.append(Step(shown or sql))

    cursor.execute("SELECT current_database(), current_schema()")
    database, schema = cursor.fetchone()
    if create:
        for role, password in ((owner, owner_password), (runtime, runtime_password)):
            _create_role(cursor, run, role, password)
        _end_membership(cursor, run, owner, runtime)
        run(f'GRANT CONNECT, TEMPORARY ON DATABASE "{database}" TO {owner}, {runtime}')
        run(f'REVOKE CREATE ON SCHEMA "{schema}" FROM PUBLIC')
        run(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO {owner}')
        _transfer_ownership(cursor, run, schema, owner)
        run(f'GRANT USAGE ON SCHEMA "{schema}" TO {runtime}')
    _grant_policy(cursor, run, schema, runtime)
    run(f'ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA "{schema}" '
        f"GRANT {', '.join(DEFAULT_PRIVILEGES)} ON TABLES TO {runtime}")
    run(f'ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA "{schema}" GRANT USAGE, SELECT ON SEQUENCES TO {runtime}')
    return steps


_ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS NOREPLICATION"


def _create_role(cursor, run, role: str, password: str | None) -> None:
    """CREATE the role (ALTER when it exists) with :data:`_ROLE_ATTRIBUTES` and, when given, the
    password (the recorded step shows ``'…'`` instead). ``run(sql, params, shown)`` runs and records."""
    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
    verb = "ALTER" if cursor.fetchone() else "CREATE"
    attrs = _ROLE_ATTRIBUTES
    if password:
        # a utility statement takes no parameters: quote the literal in the server
        cursor.execute("SELECT quote_literal(%s)", [password])
        literal = cursor.fetchone()[0]
        run(f"{verb} ROLE {role} {attrs} PASSWORD {literal}", shown=f"{verb} ROLE {role} {attrs} PASSWORD '…'")
    else:
        run(f"{verb} ROLE {role} {attrs}")


def _end_membership(cursor, run, owner: str, runtime: str) -> None:
    """REVOKE the owner role from the runtime role when it is a member (it would act as the owner)."""
    cursor.execute("SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
                   "JOIN pg_roles u ON u.oid = m.member WHERE r.rolname = %s AND u.rolname = %s", [owner, runtime])
    if cursor.fetchone():
        run(f"REVOKE {owner} FROM {runtime}")


# object kind → the names of the schema's objects of that kind not owned by the role (params: schema, role);
# sequences internal to another object (identity columns) and the functions of an extension are left out
_NOT_OWNED = (
    ("TABLE", "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
              "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm') AND pg_get_userbyid(c.relowner) <> %s"),
    ("SEQUENCE", "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE n.nspname = %s AND c.relkind = 'S' AND pg_get_userbyid(c.relowner) <> %s "
                 "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'i')"),
    ("FUNCTION", "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                 "WHERE n.nspname = %s AND pg_get_userbyid(p.proowner) <> %s "
                 "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"),
)


def _transfer_ownership(cursor, run, schema: str, owner: str) -> None:
    """ALTER … OWNER TO the owner for every table, view, sequence and function of the schema it does not own."""
    for kind, sql in _NOT_OWNED:
        cursor.execute(sql, [schema, owner])
        for (name,) in cursor.fetchall():
            target = name if kind == "FUNCTION" else f'"{schema}"."{name}"'
            run(f"ALTER {kind} {target} OWNER TO {owner}")


def _grant_policy(cursor, run, schema: str, runtime: str) -> None:
    """For every relation of the schema, in name order: REVOKE ALL from the runtime role, then grant
    USAGE, SELECT on a sequence, or the table's :data:`TABLE_PRIVILEGES` (else :data:`DEFAULT_PRIVILEGES`)."""
    cursor.execute("SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                   "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'S') ORDER BY 1", [schema])
    for name, relkind in cursor.fetchall():
        target = f'"{schema}"."{name}"'
        run(f"REVOKE ALL ON {target} FROM {runtime}")
        if relkind == "S":
            run(f"GRANT USAGE, SELECT ON SEQUENCE {target} TO {runtime}")
        else:
            run(f"GRANT {', '.join(TABLE_PRIVILEGES.get(name, DEFAULT_PRIVILEGES))} ON {target} TO {runtime}")


def runtime_findings(cursor) -> list[str]:
    """What is wrong with the role ``cursor`` is connected as, for a process that should run as the
    runtime role: each finding one line (empty: least privilege holds). PostgreSQL only."""
    cursor.execute("SELECT current_user, rolsuper, current_schema() FROM pg_roles WHERE rolname = current_user")
    user, superuser, schema = cursor.fetchone()
    findings = []
    if superuser:
        findings.append(f"connected as {user}, a superuser: it can edit or truncate events and bypass every trigger")
    cursor.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                   "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND pg_has_role(current_user, c.relowner, 'USAGE') "
                   "ORDER BY 1", [schema])
    owned = [row[0] for row in cursor.fetchall()]
    if owned:
        findings.append(f"{user} owns (or is a member of the owner of) {len(owned)} tables, e.g. "
                        f"{', '.join(owned[:3])}: it can TRUNCATE, ALTER or DROP them and disable their triggers")
    cursor.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                   "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') "
                   "AND has_table_privilege(c.oid, 'TRUNCATE') ORDER BY 1", [schema])
    truncatable = [row[0] for row in cursor.fetchall()]
    if truncatable:
        findings.append(f"{user} may TRUNCATE {len(truncatable)} tables, e.g. {', '.join(truncatable[:3])}")
    cursor.execute("SELECT CASE WHEN to_regclass(%s) IS NULL THEN false ELSE has_table_privilege(%s, 'UPDATE') "
                   "OR has_table_privilege(%s, 'DELETE') END", [EVENTS_TABLE] * 3)
    if cursor.fetchone()[0]:
        findings.append(f"{user} may UPDATE or DELETE {EVENTS_TABLE} (the event store is append-only)")
    cursor.execute("SELECT has_schema_privilege(%s, 'CREATE')", [schema])
    if cursor.fetchone()[0]:
        findings.append(f"{user} may CREATE in schema {schema} (DDL belongs to the owner role)")
    return findings
