"""A stand-in for Katana's ``renderboot``, for tests and demos where Katana is not installed.

It behaves like a render: runs for a while printing progress (``Frame 3 rendered (1 of 5)``
after each frame: what the farm's default ``CELERYFARM_FRAME_PATTERN`` matches), writes one
image per frame (small binary PPM files) into an output folder, and can be told to fail, to
spawn helper processes (children and grandchildren, as renderers and licence checkers do), to
leave them behind, to ignore SIGTERM, or to print bytes that are not UTF-8. Arguments it does
not know (a real renderboot's) are ignored, so Katana-shaped command lines run unchanged.

    python -m celeryfarm.testing.renderboot --frames 1-3 --seconds 2 --output /shared/ctx/img
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="renderboot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="1-1", help="frame range FIRST-LAST (default 1-1)")
    parser.add_argument("--seconds", type=float, default=1.0, help="total render time")
    parser.add_argument("--output", type=Path, help="folder for the frame images")
    parser.add_argument("--image-name", default="frame.%04d.ppm", help="image file pattern")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--exit-code", type=int, default=0, help="status to exit with")
    parser.add_argument("--fail-at-frame", type=int, help="exit 1 when reaching this frame")
    parser.add_argument("--children", type=int, default=0, help="helper processes to spawn")
    parser.add_argument("--grandchildren", type=int, default=1, help="helpers per child")
    parser.add_argument("--orphan-children", action="store_true",
                        help="exit without stopping the helpers (a badly behaved renderer)")
    parser.add_argument("--ignore-sigterm", action="store_true", help="survive SIGTERM")
    parser.add_argument("--binary-noise", action="store_true", help="print non-UTF-8 bytes")
    parser.add_argument("--output-bytes", type=int, default=0,
                        help="also print this many bytes of filler, in very long lines")
    parser.add_argument("--live", action="store_true", help="keep running until stopped")
    parser.add_argument("--tag", default="", help="a label carried by every process it starts")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, _unknown = parser.parse_known_args(argv)
    return args


def frame_range(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def write_image(path: Path, frame: int, size: int) -> None:
    """A binary PPM whose colour changes with the frame number."""
    shade = bytes(((frame * 37) % 256, (frame * 91) % 256, 128))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(b"P6 %d %d 255\n" % (size, size) + shade * (size * size))
    partial.replace(path)


def say(text: str) -> None:
    sys.stdout.write(f"[renderboot {os.getpid()}] {text}\n")
    sys.stdout.flush()


def spawn_helpers(args: argparse.Namespace, count: int, grandchildren: int) -> list:
    command = [sys.executable, "-m", "celeryfarm.testing.renderboot", "--child",
               "--tag", args.tag, "--grandchildren", str(grandchildren)]
    if args.ignore_sigterm:
        command.append("--ignore-sigterm")
    return [subprocess.Popen(command) for _ in range(count)]


def stop_helpers(helpers: list) -> None:
    for helper in helpers:
        helper.terminate()
    for helper in helpers:
        helper.wait()


def run_child(args: argparse.Namespace) -> int:
    """A helper process: spawns its own helpers, then idles until told to stop."""
    helpers = spawn_helpers(args, args.grandchildren, 0)
    if not args.ignore_sigterm:
        def stop(_signum: int, _frame: object) -> None:
            stop_helpers(helpers)
            sys.exit(0)

        signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child:
        return run_child(args)
    frames = frame_range(args.frames)
    helpers = spawn_helpers(args, args.children, args.grandchildren)
    if helpers:
        say(f"started {len(helpers)} helper process(es): {[h.pid for h in helpers]}")
    if args.binary_noise:
        sys.stdout.buffer.write(b"noise: \xff\xfe\xc3\x28 latin-1 caf\xe9\n")
        sys.stdout.flush()
    if args.output_bytes:
        chunk = b"x" * 65536
        for offset in range(0, args.output_bytes, len(chunk)):
            sys.stdout.buffer.write(chunk[: args.output_bytes - offset])
        sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    say(f"rendering frames {frames.start}-{frames.stop - 1} in {args.seconds:g} s")
    per_frame = args.seconds / len(frames)
    for number, frame in enumerate(frames, 1):
        if frame == args.fail_at_frame:
            say(f"ERROR: frame {frame} failed to render")
            return 1
        time.sleep(per_frame)
        if args.output:
            image = args.output / (args.image_name % frame)
            write_image(image, frame, args.size)
            say(f"frame {frame} written to {image}")
        say(f"progress {100 * number // len(frames)}% (frame {frame})")
        say(f"Frame {frame} rendered ({number} of {len(frames)})")  # celeryfarm.progress
    while args.live:
        say("live render: waiting for scene edits")
        time.sleep(max(per_frame, 0.5))
    if not args.orphan_children:
        stop_helpers(helpers)
    say(f"done, exit status {args.exit_code}")
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
