"""A process that logs facts until it is killed (run by tests/test_logger_faults.py).

Usage: python crash_logger_child.py STORE_URL SPOOL_DIR

Prints one JSON line per phase on stdout:
  {"writer_id": ...}                              once the logger is up
  {"durable": [ids...]}                           facts confirmed durable by wait_durable
                                                  (the first half also flushed to the store)
  {"more": n}                                     n more facts accepted (not waited for)
then keeps logging until SIGKILL.
"""

from __future__ import annotations

import json
import sys
import time

from factlog import FactLogger, FactType

PLAY = FactType("play", entity=("member_id", "int64"), fields={"video_id": "int64"})


def say(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    store, spool = sys.argv[1], sys.argv[2]
    lg = FactLogger(store=store, producer="crashy", spool_dir=spool, fact_types=[PLAY],
                    group_commit_interval_s=0.01, segment_max_age_s=3600,
                    heartbeat_interval_s=0.5, max_backoff_s=0.1)
    say({"writer_id": lg.writer_id})
    durable: list[str] = []
    for rnd in range(20):
        ids = [f"d-{rnd}-{i}" for i in range(250)]
        for i, fid in enumerate(ids):
            lg.log("play", {"member_id": rnd * 1000 + i, "video_id": i, "fact_id": fid})
        lg.wait_durable(lg.checkpoint(), 30)
        durable.extend(ids)
        if rnd == 9:
            lg.flush(30)  # the first half reaches the store; the rest stays in the spool
    say({"durable": durable})
    n = 0
    while True:  # facts still flowing when the kill lands: some durable, some torn, some lost
        for _ in range(100):
            lg.log("play", {"member_id": 10**6 + n, "video_id": n, "fact_id": f"u-{n}"})
            n += 1
        if n == 2000:
            say({"more": n})
        time.sleep(0.001)


if __name__ == "__main__":
    main()
