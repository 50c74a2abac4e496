"""Summarise py-spy collapsed stacks (`bench/run.py --profile DIR`): where the proxy's CPU goes.

    .venv/bin/python bench/profile_summary.py DIR/shared-http-1k-c8.txt [--top 30] [--match proxy/]

Prints the share of samples per function by self time and by inclusive time (a function counted
once per stack however deep it recurses), and the share of crawlwarden's own code (frames in
proxy/ or addons/ anywhere on the stack).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def frame_name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.12/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--match", default="", help="only functions whose file contains this")
    args = p.parse_args()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = ours = idle = 0
    for path in args.files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [frame_name(f) for f in stack.split(";")]
            total += n
            if any(_ours(f) for f in frames):
                ours += n
            if frames and ("select (selectors.py)" in frames[-1] or "epoll" in frames[-1]):
                idle += n
            self_time[frames[-1]] += n
            for f in set(frames):
                inclusive[f] += n
    if not total:
        print("no samples")
        return
    print(
        f"{total} samples; crawlwarden code on the stack {ours / total:.1%}; "
        f"idle {idle / total:.1%}"
    )
    for title, table in (("self", self_time), ("inclusive", inclusive)):
        print(f"\n-- {title} --")
        shown = 0
        for name, n in table.most_common():
            if args.match and args.match not in name:
                continue
            print(f"{n / total:7.2%}  {name}")
            shown += 1
            if shown >= args.top:
                break


def _ours(frame: str) -> bool:
    """A frame of crawlwarden's request path (not the process entry points every stack has)."""
    if "(proxy/cli.py)" in frame or "(proxy/app.py)" in frame:
        return False
    return "(proxy/" in frame or "(addons/" in frame


if __name__ == "__main__":
    main()
