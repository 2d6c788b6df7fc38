#!/usr/bin/env python3
"""DuckDB's side of integration-tests/benches/query_vs_duckdb.rs: one long-lived process that
answers one request per line on stdin with one JSON line on stdout, so that the benchmark can
alternate DuckDB's runs with Sluice's while DuckDB's caches live on between runs.

    PYTHONPATH=$(deploy/local/delta-readers.sh path) python3 duckdb_bench.py

Requests (one JSON object per line):

    {"op": "open", "table": PATH, "window_filter": SQL, "registry": PATH or null}
    {"op": "open", "files": [PATH, ...], "window_filter": SQL, "registry": PATH or null}
        Closes the previous database and opens a fresh in-memory one (so every cache starts
        empty: the cold run that follows is cold for DuckDB as it is for Sluice), turns the
        Parquet metadata cache on, and defines the views
            telemetry = SELECT * FROM delta_scan(PATH) WHERE <window_filter>
                     or SELECT * FROM read_parquet([PATH, ...], hive_partitioning = true,
                                                   hive_types_autocast = false) WHERE <window_filter>
            devices   = SELECT * FROM read_csv(REGISTRY, header = true)   (if a registry is given)
        With "table" the delta extension is loaded from its wheel and DuckDB reads the table's
        log itself on every query; with "files" it reads exactly the files given (the ones Sluice
        reads of the same table version), which works with any DuckDB, including releases that
        have no delta extension yet.
        Answer: {"version": ..., "reader": ..., "settings": {...}} with the settings that matter,
        as in effect.
    {"op": "run", "sql": SQL}
        Runs a query on the open database and fetches its whole result as one Arrow table, which
        is kept until the next run.
        Answer: {"seconds": S, "rows": N, "columns": C, "sql": the SQL as run}. The clock starts
        when the SQL is handed to DuckDB (parse, bind -- delta_scan reads the table's log here --,
        plan, run) and stops when the result is a pyarrow Table in memory.
    {"op": "write_result", "path": PATH}
        Writes the last run's result to PATH as Parquet (uncompressed), outside any clock, so
        that the benchmark can compare it value by value with Sluice's.
        Answer: {"rows": N}.

Errors answer {"error": MESSAGE}; the process goes on reading requests. It ends at end of input.

The job SQL is DataFusion's dialect; the one function DuckDB spells differently is rewritten
(see `duckdb_dialect`). Nothing is downloaded: the delta extension comes from the
duckdb-extension-delta wheel, loaded by path with extension autoinstall and autoload off.
"""

import json
import os
import re
import sys
import time
from process_exit import exit_now


# DataFusion's `approx_percentile_cont(p) WITHIN GROUP (ORDER BY x)` is DuckDB's
# `approx_quantile(x, p)`: both are t-digest estimates of the same percentile (DuckDB has no
# ordered-aggregate form of it: "Unknown ordered aggregate"). `percentile_cont` would be the
# exact percentile, more work than Sluice does, so it is not used.
_APPROX_PERCENTILE = re.compile(
    r"approx_percentile_cont\s*\(\s*([0-9.]+)\s*\)\s*WITHIN\s+GROUP\s*\(\s*ORDER\s+BY\s+([^()]+?)\s*\)",
    re.IGNORECASE,
)

# Shown once per run of the benchmark, so that the table's reader knows what DuckDB ran with.
_REPORTED_SETTINGS = (
    "threads",
    "memory_limit",
    "parquet_metadata_cache",
    "enable_external_file_cache",
    "TimeZone",
)


class RequestError(Exception):
    """A request that cannot be served; answered with {"error": ...}."""


def duckdb_dialect(sql):
    return _APPROX_PERCENTILE.sub(lambda match: f"approx_quantile({match.group(2)}, {match.group(1)})", sql)


def _sql_string(value):
    return "'" + value.replace("'", "''") + "'"


def _delta_extension(duckdb):
    try:
        import duckdb_extension_delta
    except ImportError:
        raise RequestError("cannot import duckdb_extension_delta; run with "
                           "PYTHONPATH=$(deploy/local/delta-readers.sh path)") from None
    path = os.path.join(os.path.dirname(duckdb_extension_delta.__file__), "extensions",
                        "v" + duckdb.__version__, "delta.duckdb_extension")
    if not os.path.isfile(path):
        raise RequestError(f"no delta extension for DuckDB {duckdb.__version__} at {path}; "
                           "install matching versions (deploy/local/delta-readers.sh)")
    return path


class Server:
    def __init__(self):
        import duckdb
        self.duckdb = duckdb
        self.connection = None
        self.last_result = None
        # DuckDB 2 warns that an Arrow fetch from `execute` copies the rows once more and points
        # to `sql`; in 1.5.5 `sql(...).to_arrow_table()` was the slower of the two (32-36 ms
        # against 24-28 ms on one small query in a trial). Each version gets its faster path.
        self.fetch_through_relation = int(duckdb.__version__.split(".")[0]) >= 2

    def open(self, request):
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        self.last_result = None
        duckdb = self.duckdb
        connection = duckdb.connect(":memory:", config={
            "autoinstall_known_extensions": "false",
            "autoload_known_extensions": "false",
        })
        connection.execute("SET TimeZone = 'UTC'")
        # DuckDB keeps no Parquet footers between queries unless told to (default false in
        # 1.5.5 and 2.0; `enable_object_cache` is a no-op left for compatibility in 1.5 and gone
        # in 2.0). Sluice's executor keeps footers and file statistics across runs as shipped,
        # so DuckDB gets its equivalent: the baseline at its best settings.
        connection.execute("SET parquet_metadata_cache = true")
        window_filter = request["window_filter"]
        files = request.get("files")
        if files is not None:
            if not files:
                raise RequestError("files is empty: give at least one file (DuckDB cannot read none)")
            reader = "read_parquet"
            paths = ", ".join(_sql_string(path) for path in files)
            # Partition values stay text, as in Sluice's tables (and as delta_scan reads them),
            # so the window filter compares the same types on both readers.
            source = f"read_parquet([{paths}], hive_partitioning = true, hive_types_autocast = false)"
        else:
            reader = "delta_scan"
            connection.execute("LOAD " + _sql_string(_delta_extension(duckdb)))
            source = f"delta_scan({_sql_string(request['table'])})"
        connection.execute(f"CREATE VIEW telemetry AS SELECT * FROM {source} WHERE {window_filter}")
        registry = request.get("registry")
        if registry:
            connection.execute(
                f"CREATE VIEW devices AS SELECT * FROM read_csv({_sql_string(registry)}, header = true)")
        placeholders = ", ".join("?" for _ in _REPORTED_SETTINGS)
        settings = dict(connection.execute(
            f"SELECT name, value FROM duckdb_settings() WHERE name IN ({placeholders})",
            list(_REPORTED_SETTINGS)).fetchall())
        self.connection = connection
        return {"version": duckdb.__version__, "reader": reader, "settings": settings}

    def run(self, request):
        if self.connection is None:
            raise RequestError("no table is open: send an open request first")
        sql = duckdb_dialect(request["sql"])
        connection = self.connection
        # The previous result is freed here, before the clock starts.
        self.last_result = None
        # Both clocks of the benchmark start at query submission: here when DuckDB gets the SQL
        # text. `to_arrow_table` materialises the whole result (in 1.5 `.arrow()` returns a lazy
        # RecordBatchReader, which would stop the clock before the query ran).
        started = time.perf_counter()
        if self.fetch_through_relation:
            result = connection.sql(sql).to_arrow_table()
        else:
            result = connection.execute(sql).to_arrow_table()
        seconds = time.perf_counter() - started
        self.last_result = result
        return {"seconds": seconds, "rows": result.num_rows, "columns": result.num_columns, "sql": sql}

    def write_result(self, request):
        if self.last_result is None:
            raise RequestError("no result to write: send a run request first")
        import pyarrow.parquet
        pyarrow.parquet.write_table(self.last_result, request["path"], compression="none")
        return {"rows": self.last_result.num_rows}


def main():
    try:
        server = Server()
    except ImportError as error:
        print(json.dumps({"error": f"cannot import duckdb ({error}); run with "
                                   "PYTHONPATH=$(deploy/local/delta-readers.sh path)"}), flush=True)
        return 1
    operations = {"open": server.open, "run": server.run, "write_result": server.write_result}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            operation = operations.get(request.get("op"))
            if operation is None:
                raise RequestError(f"unknown op {request.get('op')!r}: open, run or write_result")
            answer = operation(request)
        except RequestError as error:
            answer = {"error": str(error)}
        except KeyError as error:
            answer = {"error": f"the request lacks {error}"}
        except Exception as error:  # a DuckDB error in the SQL: reported, the process goes on
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    exit_now(main())
