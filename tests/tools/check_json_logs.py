"""Checks a log of allot-api started with ALLOT_LOG_FORMAT=json (deploy/local.sh test runs it).

Every line is one JSON object with a timestamp, a level and fields (the test kit's own
"----- ... starting" marker lines excepted); every line logged inside a request's span names
the request id; and the request id given on the command line (sent by the Postman collection)
appears on at least one line.

usage: check_json_logs.py LOG REQUEST_ID
"""

import json
import sys


def main(log_path: str, wanted_id: str) -> int:
    lines = checked = in_requests = 0
    seen_wanted = False
    with open(log_path, encoding="utf-8") as log:
        for number, line in enumerate(log, start=1):
            if not line.strip() or line.startswith("----- "):
                continue
            lines += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                print(f"{log_path}:{number}: not JSON ({err}): {line[:200]}")
                return 1
            for key in ("timestamp", "level", "fields"):
                if key not in record:
                    print(f"{log_path}:{number}: no {key!r}: {line[:200]}")
                    return 1
            checked += 1
            requests = [span for span in record.get("spans", []) if span.get("name") == "request"]
            if not requests:
                continue
            in_requests += 1
            request_id = requests[0].get("request_id")
            if not request_id or request_id == "-":
                print(f"{log_path}:{number}: a request's log line without a request id: {line[:200]}")
                return 1
            seen_wanted = seen_wanted or request_id == wanted_id
    if not seen_wanted:
        print(f"{log_path}: no line carries the request id {wanted_id!r}")
        return 1
    print(f"{log_path}: {checked} JSON lines, {in_requests} inside requests, all with a request id")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
