#!/usr/bin/env python3
"""Reads a Delta table with Python `deltalake` over and over, until a stop file exists, and
writes one JSON line per read: what a query engine outside Sluice saw while the table changed.

    python3 read_loop.py --table URI --stop-file PATH --out PATH
        [--columns device_id,seq] [--storage-option KEY=VALUE ...]
        [--pause-ms 20] [--timeout-seconds 300]

URI is a local path, file://PATH, or s3://bucket/prefix/table with loopback storage options,
as for read_delta.py (whose checks this script shares).

Each iteration opens `DeltaTable(URI)` afresh (so it loads the latest version), reads the
--columns of that version into Arrow (`to_pyarrow_table`, which reads the files of the loaded
snapshot) and appends one line to --out, flushed at once:

    {"version": 12, "num_rows": 3000, "num_distinct_keys": 3000, "keys_sha256": "<64 hex>",
     "num_files": 41, "started_micros": ..., "finished_micros": ...}

A read that fails is not skipped: its line is {"error": "<exception type>: <message>",
"version": <the version, or null when the load failed>, "started_micros": ..., "finished_micros": ...},
and the loop goes on.

Keys and their digest. A row's key is its --columns values in --columns order, each rendered as
text (strings as they are, integers in decimal, null as `<null>`, anything else `str()`), joined
by "/": "dev-0003/17" for device_id "dev-0003" and seq 17. `keys_sha256` is the lowercase hex
SHA-256 of every row's key (duplicates kept), sorted by code point (the same order as by UTF-8
bytes), each followed by "\n". `sluice_integration_tests::loop_keys_sha256` computes the same
bytes from the readings a test produced, so one digest compares a whole read with what was
produced. `num_distinct_keys` counts distinct keys.

Timestamps are microseconds since the Unix epoch (wall clock), comparable with the test's own.

Exit status: 0 once the stop file exists; 1 on bad arguments or when the table is not there at
start; 3 when --timeout-seconds passed or the process that started this one is gone (so a
crashed test leaves no reader behind).

The packages come from deploy/local/delta-readers.sh: PYTHONPATH=$(deploy/local/delta-readers.sh path).
"""

import argparse
import hashlib
import json
import os
import sys
import time

from read_delta import Location, ReadError
from process_exit import exit_now



class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 1, as in read_delta.py
        self.print_usage(sys.stderr)
        raise ReadError(message)


def parse_args(argv):
    parser = _Parser(description="Read a Delta table over and over; one JSON line per read.")
    parser.add_argument("--table", required=True, help="local path, file://PATH or s3://bucket/prefix")
    parser.add_argument("--stop-file", required=True, help="the loop ends once this file exists")
    parser.add_argument("--out", required=True, help="JSON-lines file written, one line per read")
    parser.add_argument("--columns", default="device_id,seq",
                        help="comma-separated key columns, read and digested in this order")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="deltalake storage option (repeatable), e.g. AWS_ENDPOINT_URL=http://127.0.0.1:9000")
    parser.add_argument("--pause-ms", type=int, default=20,
                        help="pause between reads, so the loop leaves the writers some CPU")
    parser.add_argument("--timeout-seconds", type=float, default=300.0,
                        help="give up (exit 3) if the stop file has not appeared by then")
    args = parser.parse_args(argv)
    args.columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    if not args.columns:
        raise ReadError("--columns names no column")
    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ReadError(f"--storage-option {item!r} is not KEY=VALUE")
        options[key.strip()] = value
    args.storage_options = options
    if args.pause_ms < 0:
        raise ReadError("--pause-ms must be 0 or more")
    return args


def now_micros():
    return time.time_ns() // 1_000


def key_text(value):
    """One key column's value as the digest renders it (see the module docstring)."""
    if value is None:
        return "<null>"
    if isinstance(value, bool):  # bool is an int in Python; render it as Rust would
        return "true" if value else "false"
    return str(value)


def keys_digest(table, columns):
    """(num_rows, num_distinct_keys, keys_sha256) of the key columns of a pyarrow table."""
    values = [table.column(name).to_pylist() for name in columns]
    keys = ["/".join(key_text(value) for value in row) for row in zip(*values)]
    keys.sort()
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8"))
        digest.update(b"\n")
    return len(keys), len(set(keys)), digest.hexdigest()


def read_once(deltalake, location, columns):
    """One read of the latest version; returns its line. Raises on a failed read, with the
    version (when the load got that far) on the exception."""
    started = now_micros()
    version = None
    try:
        options = dict(location.options) if location.kind in ("s3", "az") else None
        table = deltalake.DeltaTable(location.uri, storage_options=options)
        version = table.version()
        num_files = len(table.file_uris())
        data = table.to_pyarrow_table(columns=columns)
        num_rows, num_distinct_keys, keys_sha256 = keys_digest(data, columns)
    except (KeyboardInterrupt, SystemExit):
        raise
    # BaseException: a panic inside deltalake's Rust arrives as pyo3's PanicException, which is
    # not an Exception; it is a failed read like any other and is reported as a line.
    except BaseException as error:
        return {
            "error": f"{type(error).__name__}: {str(error).strip()}",
            "version": version,
            "started_micros": started,
            "finished_micros": now_micros(),
        }
    return {
        "version": version,
        "num_rows": num_rows,
        "num_distinct_keys": num_distinct_keys,
        "keys_sha256": keys_sha256,
        "num_files": num_files,
        "started_micros": started,
        "finished_micros": now_micros(),
    }


def main(argv):
    try:
        args = parse_args(argv)
        # No S3 client here may look for credentials on the network (the instance metadata
        # service is not on loopback).
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        location = Location(args.table, args.storage_options)
        try:
            import deltalake
        except ImportError as error:
            raise ReadError(f"cannot import deltalake ({error}); run with "
                            "PYTHONPATH=$(deploy/local/delta-readers.sh path)") from None
    except ReadError as error:
        print(f"read_loop.py: {error}", file=sys.stderr)
        return 1
    parent = os.getppid()
    deadline = time.monotonic() + args.timeout_seconds
    num_reads = num_errors = 0
    with open(args.out, "w", encoding="utf-8") as out:
        while not os.path.exists(args.stop_file):
            if time.monotonic() > deadline:
                print(f"read_loop.py: no stop file {args.stop_file} after {args.timeout_seconds} s",
                      file=sys.stderr)
                return 3
            if os.getppid() != parent:
                print("read_loop.py: the process that started this one is gone", file=sys.stderr)
                return 3
            line = read_once(deltalake, location, args.columns)
            num_reads += 1
            num_errors += "error" in line
            out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
            out.write("\n")
            out.flush()
            if args.pause_ms:
                time.sleep(args.pause_ms / 1_000)
    print(f"reads={num_reads} errors={num_errors}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
