"""``python -m simworld``: run the simulated world's services, or print a services TOML for it.

    python -m simworld serve --port 9001 --seed 7 --members 10000 --now 2026-11-01T00:00:00Z
    python -m simworld toml --url http://127.0.0.1:9001 [--no-batch] [--max-qps 500]
"""

from __future__ import annotations

import argparse
import json
import sys

from ttstore import TimetravelError, parse_timestamp

DEFAULT_NOW = "2026-11-01T00:00:00Z"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the world's microservices until SIGTERM/SIGINT")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--members", type=int, default=10_000)
    s.add_argument("--videos", type=int, default=500)
    s.add_argument("--now", default=DEFAULT_NOW,
                   help=f"the world's now and its start (RFC 3339; {DEFAULT_NOW})")
    s.add_argument("--rate", type=float, default=0.0,
                   help="simulated seconds per wall second (0: frozen until POST /_sim/clock)")
    s.add_argument("--faults", default=None,
                   help='initial faults as JSON: {"profile": {"error_rate": 0.2}, ...}')
    s.add_argument("--fault-seed", type=int, default=None)
    t = sub.add_parser("toml", help="print a services TOML for a running world")
    t.add_argument("--url", required=True)
    t.add_argument("--no-batch", action="store_true", help="leave out batch_url")
    t.add_argument("--max-qps", type=float, default=None)
    t.add_argument("--timeout-s", type=float, default=2.0)
    t.add_argument("--retries", type=int, default=3)
    t.add_argument("--max-concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        if args.command == "toml":
            from ._server import services_toml

            sys.stdout.write(services_toml(
                args.url, batch=not args.no_batch, max_qps=args.max_qps,
                timeout_s=args.timeout_s, retries=args.retries,
                max_concurrency=args.max_concurrency,
            ))
            return 0
        from ._server import serve
        from ._world import World

        now_us = parse_timestamp(args.now, field="--now")
        faults = json.loads(args.faults) if args.faults else None
        world = World(seed=args.seed, members=args.members, start_us=now_us, videos=args.videos)
        serve(world, host=args.host, port=args.port, rate=args.rate, faults=faults,
              fault_seed=args.fault_seed)
        return 0
    except (TimetravelError, ValueError) as exc:
        print(f"simworld: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
