"""The last lines of each failed test's report in pytest's JUnit XML files, for a lane's summary.

A CI log is often read from its tail only; pytest's short summary gives a failure's first line,
which for a failed subprocess is its exit code, not what it printed.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

LINES = 8  # a CI page may show only the last 25 lines or so: two failures' tails and their names fit
WIDTH = 240  # a line of a subprocess's repr can run to thousands of characters


def failures(paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue  # a pytest process that died before writing its report
        for case in root.iter("testcase"):
            for outcome in [*case.findall("failure"), *case.findall("error")]:
                tail = (outcome.text or outcome.get("message") or "").rstrip().splitlines()[-LINES:]
                out += [f"--- {case.get('classname')} {case.get('name')}", *(line[:WIDTH] for line in tail)]
    return out


if __name__ == "__main__":
    print("\n".join(failures(sys.argv[1:])))
