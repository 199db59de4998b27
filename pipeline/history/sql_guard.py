"""What the worker's ``POST /query`` may run: one SELECT over the ledger's own
database, nothing else.

The SQL comes from outside (the CLI, the dashboard, an operator's script), so
three fences stand between it and the engine:

1. ``schema.read_only_select``: one statement, starting SELECT or WITH, no FORMAT.
2. Here: the engine's own parser (``EXPLAIN AST``, which parses and runs
   nothing) gives the query's tree, and it is refused when it names a table
   outside ``schema.DATABASE`` (system tables, other databases), calls a
   table function (file, url, s3, remote, numbers…), a function that reaches
   past the query's tables (file, dictGet…, joinGet…, getSetting…) or sleeps,
   carries a SETTINGS clause, or writes its result somewhere (INTO OUTFILE).
   Unqualified table names are allowed only as the query's own WITH names.
3. The store runs it read-only: chDB with ``readonly=1`` (no writes, no
   settings changes, no table functions), a ClickHouse server with
   ``readonly=2`` (see clickhouse_store).

Reading the same engine's parser, rather than a Python one, means the tree
checked is the tree that runs.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.history import schema
from pipeline.history.store import QueryRejected

_NODE = re.compile(r"^(?P<indent> *)(?P<kind>\w+)(?: (?P<rest>.*))?$")
_CHILDREN = re.compile(r" \(children \d+\)$")
_ALIAS = re.compile(r" \(alias .*\)$")
# A WITH name: ``name AS (`` (backquoted names too). Read from the text, as
# EXPLAIN AST does not print it; a false match (inside a string) only lets an
# unqualified name through, which resolves to a WITH name or to the current
# database: ``default``, empty, on chDB; on a ClickHouse server, grant the
# ledger's user the ledger's database only.
_WITH_NAME = re.compile(r"(?:\b([A-Za-z_][A-Za-z0-9_]*)|`((?:[^`\\]|\\.)*)`)\s+AS\s*\(", re.IGNORECASE)

# Functions that read outside the query's tables, or stall the engine.
DENIED_FUNCTIONS = frozenset(
    {
        "file", "joinget", "joingetornull", "hascolumnintable", "getsetting", "getsettingordefault",
        "getserversetting", "getmergetreesetting", "catboostevaluate", "modelevaluate", "sleep", "sleepeachrow",
        "getmacro", "getclienthttpheader", "currentquerieslist",
    }
)
DENIED_PREFIXES = ("dict", "filesystem", "__")
# Their right side may name a table: ``x IN db.table``.
_IN_FUNCTIONS = frozenset(
    {"in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin", "globalnotnullin"}
)


def with_names(sql: str) -> set[str]:
    return {(plain or quoted) for plain, quoted in _WITH_NAME.findall(sql)}


def _parse(ast: str) -> list[tuple[int, str, str]]:
    """(depth, kind, name) per line of ``EXPLAIN AST``."""
    nodes = []
    for line in ast.splitlines():
        if not line.strip():
            continue
        match = _NODE.match(line)
        if match is None:
            raise QueryRejected(f"cannot read the query's syntax tree at {line.strip()[:80]!r}")
        rest = _ALIAS.sub("", _CHILDREN.sub("", match.group("rest") or ""))
        nodes.append((len(match.group("indent")), match.group("kind"), rest))
    return nodes


def _table_allowed(name: str, cte_names: set[str]) -> bool:
    database, dot, _ = name.partition(".")
    return (dot and database == schema.DATABASE) or (not dot and name in cte_names)


def vet(ast: str, sql: str) -> None:
    """Raise QueryRejected, naming what, unless the tree is one plain SELECT over the ledger."""
    nodes = _parse(ast)
    if not nodes or nodes[0][1] != "SelectWithUnionQuery":
        raise QueryRejected("only a SELECT is allowed")
    ctes = with_names(sql)
    parents: list[tuple[int, str, str]] = []
    for index, (depth, kind, name) in enumerate(nodes):
        while parents and parents[-1][0] >= depth:
            parents.pop()
        parent = parents[-1] if parents else None
        if depth == 1 and parent is not None and parent[1] == "SelectWithUnionQuery" and kind != "ExpressionList":
            raise QueryRejected("INTO OUTFILE and other output clauses are not allowed")
        if kind == "Set" or kind == "SetQuery":
            raise QueryRejected("a SETTINGS clause is not allowed")
        if kind == "TableIdentifier" and not _table_allowed(name, ctes):
            raise QueryRejected(f"only the {schema.DATABASE} database may be read, not {name}")
        if kind == "Function":
            lowered = name.lower()
            if parent is not None and parent[1] == "TableExpression":
                raise QueryRejected(f"table functions are not allowed ({name})")
            if lowered in DENIED_FUNCTIONS or lowered.startswith(DENIED_PREFIXES):
                raise QueryRejected(f"the function {name} is not allowed")
            if lowered in _IN_FUNCTIONS:
                _vet_in(nodes, index, ctes)
        parents.append((depth, kind, name))


def _vet_in(nodes: list[tuple[int, str, str]], index: int, ctes: set[str]) -> None:
    """``x IN name``: a qualified name there is a table, and must be the ledger's."""
    depth = nodes[index][0]
    direct = []  # Function > ExpressionList > its arguments
    for node in nodes[index + 1 :]:
        if node[0] <= depth:
            break
        if node[0] == depth + 2:
            direct.append(node)
    if len(direct) == 2 and direct[1][1] == "Identifier" and "." in direct[1][2]:
        if not _table_allowed(direct[1][2], ctes):
            raise QueryRejected(f"only the {schema.DATABASE} database may be read, not {direct[1][2]}")


async def guarded_query(history: Any, sql: str) -> list[dict[str, Any]]:
    """``sql``'s rows when every fence lets it through, else QueryRejected."""
    text = schema.read_only_select(sql)
    if text is None:
        raise QueryRejected("only a single SELECT (or WITH … SELECT) statement is allowed, without FORMAT")
    vet(await history.explain_ast(text), text)
    return await history.query(text)
