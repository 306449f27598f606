"""Print one closing line for several pytest JUnit XML reports: `total: N passed, N failed, N skipped`.

Exits 1 when any test failed or errored, or when a report is missing (its run crashed).
"""

import sys
import xml.etree.ElementTree as ET


def counts(path: str) -> tuple[int, int, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tests = failed = skipped = 0
    for suite in suites:
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def main(paths: list[str]) -> int:
    passed = failed = skipped = 0
    missing = []
    for path in paths:
        try:
            p, f, s = counts(path)
        except (OSError, ET.ParseError):
            missing.append(path)
            continue
        passed, failed, skipped = passed + p, failed + f, skipped + s
    for path in missing:
        print(f"no report at {path}: that test run crashed before finishing", file=sys.stderr)
    print(f"total: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
