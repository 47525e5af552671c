"""Run ``mailbridge`` on uvloop's event loop instead of asyncio's, to measure whether it helps.

uvloop is not a dependency of mailbridge: install it into the venv by hand
(``.venv/bin/pip install uvloop``); the harness lists ``mailbridge-sync-uvloop``
as not measured when it is missing. Same settings and arguments as ``mailbridge``.
"""

from __future__ import annotations

import sys

import uvloop

from mailbridge import cli

if __name__ == "__main__":
    uvloop.install()  # asyncio.run() in the CLI now makes a uvloop loop
    sys.exit(cli.main())
