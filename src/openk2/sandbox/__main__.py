"""`python -m openk2.sandbox`: which isolation level this machine gives the sandbox, and why not a stronger one."""

from __future__ import annotations

import sys

from openk2.sandbox import Sandbox


def main() -> int:
    sandbox = Sandbox(parallel=1)
    result = sandbox.run(code="print('ok')")
    print(f"isolation: {sandbox.isolation}")
    print(f"reason: {sandbox.isolation_reason}")
    print(f"python for programs: {sandbox.python}")
    print(f"smoke test: {'passed' if result.stdout == 'ok' + chr(10) else 'FAILED: ' + result.stderr.strip()}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
