"""Coverage-guided fuzzing of the bridge with atheris (libFuzzer for Python).

    .venv/bin/python -m fuzz.run smtp  fuzz/corpus/smtp  -max_total_time=3600
    .venv/bin/python -m fuzz.run mime  fuzz/corpus/mime  -max_total_time=3600
    .venv/bin/python -m fuzz.run data  fuzz/corpus/data  -max_total_time=3600
    .venv/bin/python -m fuzz.run path  fuzz/corpus/path  -max_total_time=3600

Arguments after the target name go to libFuzzer unchanged (``-runs=``,
``-max_total_time=``, ``-jobs=``, a corpus folder, ``-artifact_prefix=``...). A
crash is written as ``crash-<sha1>``; replay it with the same command and the
file as the only argument, then add it as a regression case (``fuzz/README.md``).
The targets and their invariants live in :mod:`fuzz.targets`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

TARGETS = ("smtp", "mime", "data", "path")


def _smtp(raw: bytes) -> None:
    from fuzz import targets

    if not raw:
        return
    # The first byte picks the chunk size, so splits inside commands are explored too.
    size, stream = 1 + raw[0] % 64, raw[1:]
    targets.smtp_session([stream[i : i + size] for i in range(0, len(stream), size)])


def _mime(raw: bytes) -> None:
    from fuzz import targets

    targets.mime(raw)


def _data(raw: bytes) -> None:
    from fuzz import targets

    if len(raw) < 4:
        return
    chunk, max_bytes, max_line, budget = raw[0], raw[1], raw[2], raw[3]
    targets.data_reader(
        raw[4:],
        chunk=1 + chunk % 64,
        max_bytes=1 + max_bytes * 4,
        max_line=1 + max_line % 128,
        budget_bytes=None if budget < 128 else (budget - 128) * 32,
    )


def _path(raw: bytes) -> None:
    from fuzz import targets

    # As aiosmtpd hands a MAIL/RCPT argument over: UTF-8 with surrogate escapes.
    targets.address_path(raw.decode("utf-8", "surrogateescape"))


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options]")
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: .venv/bin/pip install atheris (see fuzz/README.md)")
    # aiosmtpd warns about every unknown verb; the fuzzer sends millions.
    logging.disable(logging.CRITICAL)
    name = argv[1]
    with atheris.instrument_imports(include=["mailbridge", "aiosmtpd", "email", "fuzz"]):
        from fuzz import targets  # noqa: F401  (instrumented on first import)
    chosen: Callable[[bytes], None] = {"smtp": _smtp, "mime": _mime, "data": _data, "path": _path}[
        name
    ]
    atheris.Setup([argv[0], *argv[2:]], chosen)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
