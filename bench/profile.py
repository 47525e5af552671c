"""Profile mailbridge under benchmark load with py-spy; print where the time goes.

Starts the webhook sink and ``mailbridge`` (sync mode, or ``--mode spool``) as the
harness does, records it with ``py-spy record --format raw`` (collapsed stacks,
all threads, native frames off) while ``smtp-source`` sends ``--messages``
messages of ``--size`` bytes over ``--sessions`` reused sessions, then prints
the functions with the most samples, inclusive and self, as a share of all
samples. The raw stacks stay in ``bench/.work/profile-*.txt`` (load them into
speedscope or flamegraph.pl).

Needs py-spy in the venv (``.venv/bin/pip install py-spy``; not a project
dependency). Usage: ``.venv/bin/python bench/profile.py --size 1024``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def summarise(stacks: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames_text, _, count_text = line.rpartition(" ")
        if not frames_text:
            continue
        count = int(count_text)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
            for f in frames_text.split(";")[1:]
        ]  # drop the thread frame
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(out)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--mode", choices=["sync", "spool"], default="sync")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    sink = harness.Sink()
    await sink.start()
    server = harness.Server(harness.SERVERS[f"mailbridge-{args.mode}"], sink.hook)
    await server.start()
    stacks = harness.WORK / f"profile-{args.mode}-{args.size}.txt"
    spy = await asyncio.create_subprocess_exec(
        str(harness.ROOT / ".venv" / "bin" / "py-spy"),
        "record",
        "--pid",
        str(server.pid),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(stacks),
        "--threads",
        "--duration",
        "600",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)
    source = await asyncio.create_subprocess_exec(
        "smtp-source",
        "-d",
        "-s",
        str(args.sessions),
        "-m",
        str(args.messages),
        "-l",
        str(args.size),
        "-f",
        harness.SENDER,
        "-t",
        harness.RECIPIENT,
        f"{harness.HOST}:{server.port}",
    )
    try:
        await asyncio.wait_for(source.wait(), harness.RUN_CAP_SECONDS)
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        await asyncio.wait_for(spy.wait(), 30)
        await server.stop()
        await sink.stop()
    print(f"stacks: {stacks}")
    print(summarise(stacks, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
