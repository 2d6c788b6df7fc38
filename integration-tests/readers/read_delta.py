#!/usr/bin/env python3
"""Reads a Delta table the way an outside engine would and prints its rows as JSON lines.

    python3 read_delta.py --reader deltalake|polars|duckdb --table URI
        [--filter "dt = '2026-11-26'"] [--columns a,b,c] [--storage-option KEY=VALUE ...]
        [--version N] [--sort]

URI is a local path, file://PATH, s3://bucket/prefix/table (with --storage-option
AWS_ENDPOINT_URL=http://127.0.0.1:PORT and keys) or az://container/prefix/table (deltalake and
polars only, with --storage-option azure_storage_endpoint=http://127.0.0.1:PORT/ACCOUNT,
azure_storage_account_name, azure_storage_account_key and azure_allow_http=true, as for
Azurite). Only loopback endpoints are accepted.

stdout: one JSON object per row, keys in --columns order or else the table's schema order.
Timestamps are integer microseconds since the epoch (UTC), dates ISO strings, binary hex,
NaN/inf/-inf the strings "NaN"/"inf"/"-inf", nulls null. --sort sorts the lines.
stderr, last line: rows=<n> version=<table version, or "unknown" where the reader cannot tell>.
Exit status 1 with a message on stderr on any error.

The packages come from deploy/local/delta-readers.sh: PYTHONPATH=$(deploy/local/delta-readers.sh path).
"""

import argparse
import datetime as _dt
import decimal
import glob
import ipaddress
import json
import math
import os
import sys
import urllib.parse
from process_exit import exit_now


EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
ONE_MICROSECOND = _dt.timedelta(microseconds=1)


class ReadError(Exception):
    """An error to report on stderr with exit status 1."""


# ---------------------------------------------------------------------------------------------
# Arguments, table location and storage options


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 1 too, not argparse's 2
        self.print_usage(sys.stderr)
        raise ReadError(message)


def parse_args(argv):
    parser = _Parser(description="Read a Delta table and print its rows as JSON lines.")
    parser.add_argument("--reader", required=True, choices=["deltalake", "polars", "duckdb"])
    parser.add_argument("--table", required=True, help="local path, file://PATH, s3://bucket/prefix or az://container/prefix")
    parser.add_argument("--filter", help="SQL predicate, e.g. \"dt = '2026-11-26' AND hour = '03'\"")
    parser.add_argument("--columns", help="comma-separated columns, printed in this order")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="deltalake storage option (repeatable), e.g. AWS_ENDPOINT_URL=http://127.0.0.1:9000")
    parser.add_argument("--version", type=int, help="read this table version instead of the latest")
    parser.add_argument("--sort", action="store_true", help="sort the output lines")
    args = parser.parse_args(argv)
    args.columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ReadError(f"--storage-option {item!r} is not KEY=VALUE")
        options[key.strip()] = value
    args.storage_options = options
    if args.version is not None and args.version < 0:
        raise ReadError("--version must be 0 or more")
    return args


class Location:
    """Where the table is: a local directory, or s3 or Azure Blob behind a loopback endpoint."""

    def __init__(self, uri, options):
        self.options = options
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme in ("", "file"):
            path = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else uri
            if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
                raise ReadError(f"file URI with a host is not supported: {uri}")
            self.kind = "local"
            self.uri = os.path.abspath(path)
            if not os.path.isdir(os.path.join(self.uri, "_delta_log")):
                raise ReadError(f"no Delta table at {self.uri} (no _delta_log directory)")
        elif parsed.scheme in ("s3", "s3a"):
            if not parsed.netloc:
                raise ReadError(f"no bucket in {uri}")
            self.kind = "s3"
            self.uri = "s3://" + parsed.netloc + parsed.path.rstrip("/")
            self.bucket = parsed.netloc
            self._check_s3_options()
        elif parsed.scheme == "az":
            if not parsed.netloc:
                raise ReadError(f"no container in {uri}")
            self.kind = "az"
            self.uri = "az://" + parsed.netloc + parsed.path.rstrip("/")
            self._check_azure_options()
        else:
            raise ReadError(f"unsupported table URI scheme {parsed.scheme!r}: use a path, file://, s3:// or az://")

    def option(self, *names):
        """The first storage option (keys matched case-insensitively) among names, else None."""
        lowered = {k.lower(): v for k, v in self.options.items()}
        for name in names:
            if name.lower() in lowered:
                return lowered[name.lower()]
        return None

    def endpoint(self):
        return self.option("aws_endpoint_url", "aws_endpoint", "endpoint_url", "endpoint")

    def _check_loopback(self, endpoint):
        host = urllib.parse.urlparse(endpoint).hostname or ""
        loopback = host == "localhost"
        try:
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        if not loopback:
            raise ReadError(f"refusing endpoint {endpoint}: only loopback (127.0.0.1, localhost, ::1) is allowed")

    def _check_azure_options(self):
        endpoint = self.option("azure_storage_endpoint", "azure_endpoint", "endpoint")
        if not endpoint:
            raise ReadError("az needs --storage-option azure_storage_endpoint=http://127.0.0.1:PORT/ACCOUNT; "
                            "this reader only talks to a server on this machine")
        self._check_loopback(endpoint)
        if not (self.option("azure_storage_account_name", "account_name") and
                self.option("azure_storage_account_key", "azure_storage_access_key", "account_key", "access_key")):
            # Without a key the Azure client would ask the managed identity endpoint, which is
            # not on this machine.
            raise ReadError("az needs --storage-option azure_storage_account_name=... and azure_storage_account_key=...")

    def _check_s3_options(self):
        endpoint = self.endpoint()
        if not endpoint:
            raise ReadError("s3 needs --storage-option AWS_ENDPOINT_URL=http://127.0.0.1:PORT; "
                            "this reader only talks to a server on this machine")
        self._check_loopback(endpoint)
        if not (self.option("aws_access_key_id", "access_key_id") and
                self.option("aws_secret_access_key", "secret_access_key")):
            # Without keys the S3 clients would look for credentials elsewhere, such as the
            # instance metadata service, which is not on this machine.
            raise ReadError("s3 needs --storage-option AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=...")


# ---------------------------------------------------------------------------------------------
# A small SQL predicate parser, for the deltalake reader (pyarrow has no SQL parser)
#
#   expr      := and_expr (OR and_expr)*
#   and_expr  := not_expr (AND not_expr)*
#   not_expr  := NOT not_expr | predicate
#   predicate := operand [cmp operand | [NOT] IN (literal, ...) | [NOT] BETWEEN operand AND operand
#                | [NOT] LIKE 'pattern' | IS [NOT] NULL]
#   operand   := ( expr ) | column | "column" | 'string' | number | TRUE | FALSE | NULL


_KEYWORDS = {"AND", "OR", "NOT", "IN", "BETWEEN", "LIKE", "IS", "NULL", "TRUE", "FALSE"}
_COMPARISONS = {"=": "eq", "==": "eq", "!=": "ne", "<>": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}


def _tokenize(text):
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "'" or ch == '"':
            j, out = i + 1, []
            while True:
                if j >= len(text):
                    raise ReadError(f"--filter: unterminated quote in {text!r}")
                if text[j] == ch:
                    if j + 1 < len(text) and text[j + 1] == ch:  # '' or "" inside quotes
                        out.append(ch)
                        j += 2
                        continue
                    break
                out.append(text[j])
                j += 1
            tokens.append(("str" if ch == "'" else "ident", "".join(out)))
            i = j + 1
        elif text.startswith(("<=", ">=", "<>", "!=", "=="), i):
            tokens.append(("op", text[i:i + 2]))
            i += 2
        elif ch in "=<>(),":
            tokens.append(("op", ch))
            i += 1
        elif ch.isdigit() or (ch in "+-." and i + 1 < len(text) and (text[i + 1].isdigit() or text[i + 1] == ".")):
            j = i + 1
            while j < len(text) and (text[j].isalnum() or text[j] in ".+-") and not (
                    text[j] in "+-" and text[j - 1] not in "eE"):
                j += 1
            literal = text[i:j]
            try:
                value = int(literal)
            except ValueError:
                try:
                    value = float(literal)
                except ValueError:
                    raise ReadError(f"--filter: bad number {literal!r}") from None
            tokens.append(("num", value))
            i = j
        elif ch.isalpha() or ch == "_":
            j = i + 1
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            tokens.append(("kw", word.upper()) if word.upper() in _KEYWORDS else ("ident", word))
            i = j
        else:
            raise ReadError(f"--filter: unexpected character {ch!r} in {text!r}")
    return tokens


class _PredicateParser:
    def __init__(self, text):
        import pyarrow.dataset as ds
        self.ds = ds
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def parse(self):
        expr = self.expr()
        if self.pos != len(self.tokens):
            self.fail(f"unexpected {self.tokens[self.pos][1]!r}")
        if expr[0] != "expr":
            self.fail("the filter is not a condition")
        return expr[1]

    def fail(self, message):
        raise ReadError(f"--filter {self.text!r}: {message} (supported: =, <>, <, <=, >, >=, [NOT] IN, "
                        "[NOT] BETWEEN, [NOT] LIKE, IS [NOT] NULL, AND, OR, NOT, parentheses)")

    def peek(self, kind=None, value=None):
        if self.pos >= len(self.tokens):
            return False
        k, v = self.tokens[self.pos]
        return (kind is None or k == kind) and (value is None or v == value)

    def take(self, kind=None, value=None):
        if not self.peek(kind, value):
            self.fail(f"expected {value or kind}")
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def condition(self, node):
        if node[0] != "expr":
            self.fail("AND/OR/NOT need conditions on both sides")
        return node[1]

    def expr(self):
        left = self.and_expr()
        while self.peek("kw", "OR"):
            self.pos += 1
            left = ("expr", self.condition(left) | self.condition(self.and_expr()))
        return left

    def and_expr(self):
        left = self.not_expr()
        while self.peek("kw", "AND"):
            self.pos += 1
            left = ("expr", self.condition(left) & self.condition(self.not_expr()))
        return left

    def not_expr(self):
        if self.peek("kw", "NOT"):
            self.pos += 1
            return ("expr", ~self.condition(self.not_expr()))
        return self.predicate()

    def operand(self):
        if self.peek("op", "("):
            self.pos += 1
            inner = self.expr()
            self.take("op", ")")
            return inner
        if self.peek("ident"):
            return ("expr", self.ds.field(self.take("ident")))
        return ("lit", self.literal())

    def literal(self):
        if self.peek("str") or self.peek("num"):
            return self.take()
        if self.peek("kw", "TRUE") or self.peek("kw", "FALSE"):
            return self.take() == "TRUE"
        if self.peek("kw", "NULL"):
            self.pos += 1
            return None
        self.fail("expected a column or a literal")

    def value(self, node):
        return node[1] if node[0] == "expr" else self.ds.scalar(node[1])

    def predicate(self):
        left = self.operand()
        negate = False
        if self.peek("kw", "NOT") and self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1][1] in ("IN", "BETWEEN", "LIKE"):
            self.pos += 1
            negate = True
        if self.peek("op") and self.tokens[self.pos][1] in _COMPARISONS:
            op = _COMPARISONS[self.take()]
            right = self.operand()
            a, b = self.value(left), self.value(right)
            result = {"eq": lambda: a == b, "ne": lambda: a != b, "lt": lambda: a < b,
                      "le": lambda: a <= b, "gt": lambda: a > b, "ge": lambda: a >= b}[op]()
            return ("expr", result)
        if self.peek("kw", "IN"):
            self.pos += 1
            self.take("op", "(")
            values = [self.literal()]
            while self.peek("op", ","):
                self.pos += 1
                values.append(self.literal())
            self.take("op", ")")
            result = self.value(left).isin([v for v in values if v is not None])
            return ("expr", ~result if negate else result)
        if self.peek("kw", "BETWEEN"):
            self.pos += 1
            low = self.operand()
            self.take("kw", "AND")
            high = self.operand()
            x = self.value(left)
            result = (x >= self.value(low)) & (x <= self.value(high))
            return ("expr", ~result if negate else result)
        if self.peek("kw", "LIKE"):
            self.pos += 1
            import pyarrow.compute as pc
            result = pc.match_like(self.value(left), self.take("str"))
            return ("expr", ~result if negate else result)
        if self.peek("kw", "IS"):
            self.pos += 1
            is_not = bool(self.peek("kw", "NOT")) and bool(self.take("kw", "NOT"))
            self.take("kw", "NULL")
            result = self.value(left).is_null()
            return ("expr", ~result if is_not else result)
        if negate:
            self.fail("expected IN, BETWEEN or LIKE after NOT")
        return left


# ---------------------------------------------------------------------------------------------
# Readers: each returns (pyarrow.Table, version or None)


def _import(name):
    try:
        return __import__(name)
    except ImportError as error:
        raise ReadError(f"cannot import {name} ({error}); run with "
                        "PYTHONPATH=$(deploy/local/delta-readers.sh path)") from None


def _deltalake_options(location):
    return dict(location.options) if location.kind in ("s3", "az") else None


def read_with_deltalake(location, args):
    deltalake = _import("deltalake")
    table = deltalake.DeltaTable(location.uri, version=args.version,
                                 storage_options=_deltalake_options(location))
    schema_names = [field.name for field in table.schema().fields]
    unknown = [c for c in args.columns or [] if c not in schema_names]
    if unknown:
        raise ReadError(f"no column {', '.join(unknown)} in the table (columns: {', '.join(schema_names)})")
    columns = args.columns or schema_names
    dataset = table.to_pyarrow_dataset()
    expression = _PredicateParser(args.filter).parse() if args.filter else None
    return dataset.to_table(columns=columns, filter=expression), table.version()


def read_with_polars(location, args):
    deltalake = _import("deltalake")
    pl = _import("polars")
    options = _deltalake_options(location)
    # Polars reads the snapshot of this DeltaTable (it lists the files through deltalake and
    # reads them itself), so the version printed is the one read.
    table = deltalake.DeltaTable(location.uri, version=args.version, storage_options=options)
    frame = pl.read_delta(table, storage_options=options, credential_provider=None)
    if args.filter:
        try:
            frame = frame.filter(pl.sql_expr(args.filter))
        except Exception as error:  # polars raises several error types for a bad expression
            raise ReadError(f"--filter {args.filter!r}: {error}") from None
    columns = args.columns or [field.name for field in table.schema().fields]
    return frame.select(columns).to_arrow(), table.version()


def _duckdb_extension(module_name, extension, duckdb_version):
    try:
        module = __import__(module_name)
    except ImportError:
        raise ReadError(f"cannot import {module_name}, which carries DuckDB's {extension} extension; run with "
                        "PYTHONPATH=$(deploy/local/delta-readers.sh path)") from None
    base = os.path.dirname(module.__file__)
    exact = os.path.join(base, "extensions", "v" + duckdb_version, extension + ".duckdb_extension")
    if os.path.isfile(exact):
        return exact
    found = sorted(glob.glob(os.path.join(base, "extensions", "*", extension + ".duckdb_extension")))
    raise ReadError(f"{module_name} has no {extension} extension for DuckDB {duckdb_version} "
                    f"(found: {', '.join(found) or 'none'}); install matching versions")


def _sql_string(value):
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(name):
    return '"' + name.replace('"', '""') + '"'


def _duckdb_secret(location):
    endpoint = urllib.parse.urlparse(location.endpoint())
    use_ssl = endpoint.scheme == "https"
    host = endpoint.netloc
    virtual = (location.option("aws_virtual_hosted_style_request", "virtual_hosted_style_request") or "").lower()
    parts = [
        "TYPE S3",
        "PROVIDER config",
        "KEY_ID " + _sql_string(location.option("aws_access_key_id", "access_key_id")),
        "SECRET " + _sql_string(location.option("aws_secret_access_key", "secret_access_key")),
        "ENDPOINT " + _sql_string(host),
        "URL_STYLE " + _sql_string("vhost" if virtual == "true" else "path"),
        "USE_SSL " + ("true" if use_ssl else "false"),
        "REGION " + _sql_string(location.option("aws_region", "region", "aws_default_region") or "us-east-1"),
        "SCOPE " + _sql_string("s3://" + location.bucket),
    ]
    token = location.option("aws_session_token", "session_token", "aws_token", "token")
    if token:
        parts.append("SESSION_TOKEN " + _sql_string(token))
    return "CREATE SECRET sluice_s3 (" + ", ".join(parts) + ")"


def read_with_duckdb(location, args):
    duckdb = _import("duckdb")
    # Nothing is downloaded: extensions come from the duckdb-extension-* wheels, loaded by path.
    if location.kind == "az":
        raise ReadError("the duckdb reader reads local and s3:// tables only")
    connection = duckdb.connect(config={"autoinstall_known_extensions": "false",
                                        "autoload_known_extensions": "false"})
    connection.execute("LOAD " + _sql_string(_duckdb_extension("duckdb_extension_delta", "delta", duckdb.__version__)))
    if location.kind == "s3":
        # DuckDB reaches S3 through its httpfs extension (the delta extension reads the log
        # itself but the data files through DuckDB's file system); both come from wheels.
        connection.execute("LOAD " + _sql_string(_duckdb_extension("duckdb_extension_httpfs", "httpfs", duckdb.__version__)))
        connection.execute(_duckdb_secret(location))
    scan = "delta_scan(" + _sql_string(location.uri)
    if args.version is not None:
        scan += f", version => {int(args.version)}"
    scan += ")"
    projection = ", ".join(_sql_ident(c) for c in args.columns) if args.columns else "*"
    query = f"SELECT {projection} FROM {scan}"
    if args.filter:
        query += f" WHERE {args.filter}"
    try:
        result = connection.execute(query)
        table = result.to_arrow_table() if hasattr(result, "to_arrow_table") else result.fetch_arrow_table()
    except duckdb.Error as error:
        raise ReadError(f"duckdb: {error}") from None
    # DuckDB's delta extension does not tell which version it read.
    return table, args.version


READERS = {"deltalake": read_with_deltalake, "polars": read_with_polars, "duckdb": read_with_duckdb}


# ---------------------------------------------------------------------------------------------
# JSON-safe values


def jsonable(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:  # timestamp without time zone: its wall clock taken as UTC
            value = value.replace(tzinfo=_dt.timezone.utc)
        return (value - EPOCH) // ONE_MICROSECOND
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, _dt.time):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value // ONE_MICROSECOND
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def rows_as_json(table):
    names = table.column_names
    for batch in table.to_batches():
        columns = [column.to_pylist() for column in batch.columns]
        for values in zip(*columns):
            row = {name: jsonable(value) for name, value in zip(names, values)}
            yield json.dumps(row, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def main(argv):
    try:
        args = parse_args(argv)
        # No S3 client here may look for credentials on the network (the instance metadata
        # service is not on loopback).
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        location = Location(args.table, args.storage_options)
        try:
            table, version = READERS[args.reader](location, args)
        except ReadError:
            raise
        except Exception as error:
            raise ReadError(f"{args.reader}: {type(error).__name__}: {error}") from None
        lines = rows_as_json(table)
        if args.sort:
            lines = sorted(lines)
        count = 0
        out = sys.stdout
        for line in lines:
            out.write(line)
            out.write("\n")
            count += 1
        out.flush()
        print(f"rows={count} version={'unknown' if version is None else version}", file=sys.stderr)
        return 0
    except ReadError as error:
        print(f"read_delta.py: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
