"""The demo's feature repo: copy this file to start your own.

A feature repo is a plain Python module (``--repo PATH`` or ``TIMETRAVEL_REPO``) that declares
three things, and nothing else is needed:

1. **Fact types**: what services log at serving time (here: plays, recommendation requests,
   the impressions a client rendered, and the feature values the recommender served).
2. **Snapshot services**: microservices whose state is snapshotted on a schedule for a
   stratified panel of members (here: the simulated world's viewing history, my list and
   profile).
3. **Encoders**: plain functions of the as-of view. The recommender calls these very functions
   online on the live view it assembled; the training-set build calls them offline on the view
   reconstructed as of any past time. Fact-fed encoders give identical values both ways
   (checked by ``parity_report``); snapshot-fed ones approximate the past by design.

Write encoders so the order of equal-time facts never matters (``math.fsum`` instead of
``sum`` for floats): then online and offline agree to the last bit.

The simulated world's URL comes from ``TIMETRAVEL_DEMO_WORLD`` (the demo sets it).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

from factlog import FactType
from snapshotter import ServiceConfig
from timetravel_api import View, encoder, facts, served_features_type, snapshot

MEMBER = ("member_id", "int64")

# -- 1. fact types ------------------------------------------------------------------------------
#: A member played a title (organic, or from a recommendation); devices that were offline report
#: their plays late, so ``logged_at`` can be hours after ``event_time``.
playback = FactType("playback", entity=MEMBER, lookback="30d", fields={
    "video_id": "int64", "genre": "string", "seconds": "float64", "device": "string",
    "source": "string",        # "organic" or "recommendation"
    "request_id": "string",    # the recommendation it came from, if any
})
#: The recommender received a request (logged before it computes features).
recommendation_request = FactType("recommendation_request", entity=MEMBER, lookback="30d",
                                  fields={"request_id": "string", "device": "string"})
#: The client rendered a recommended title (logged by the client, just after the answer).
impression = FactType("impression", entity=MEMBER, lookback="30d", fields={
    "request_id": "string", "video_id": "int64", "genre": "string", "position": "int64",
    "score": "float64",
})
#: The feature values the recommender served, for the online/offline parity check.
served_features = served_features_type(MEMBER)

# -- 2. snapshot services -----------------------------------------------------------------------
WORLD_URL = os.environ.get("TIMETRAVEL_DEMO_WORLD", "http://127.0.0.1:9001").rstrip("/")
services = {
    name: ServiceConfig(
        name=name,
        url=f"{WORLD_URL}/v1/{name}/{{entity_id}}",
        batch_url=f"{WORLD_URL}/v1/{name}:batchGet",
        max_staleness="24h",   # snapshots run every 12h: one missed run is still fresh
        max_concurrency=16,
    )
    for name in ("viewing_history", "my_list", "profile")
}


# -- 3. encoders --------------------------------------------------------------------------------
@encoder(inputs=[facts("playback", window="7d")], output="float64")
def minutes_7d(view: View) -> float:
    """Minutes watched in the last 7 days (the built-in ``playback.seconds.sum.7d`` / 60)."""
    return math.fsum(f["seconds"] for f in view.facts("playback")
                     if f["seconds"] is not None) / 60


@encoder(inputs=[facts("playback", window="1d")], output="int64")
def plays_1d(view: View) -> int:
    """Plays in the last day (the built-in ``playback.count.1d``)."""
    return len(view.facts("playback"))


@encoder(inputs=[facts("playback")], output="float64")
def hours_since_last_play(view: View) -> float | None:
    """Hours since the last play within the 30-day lookback; None if there was none."""
    rows = view.facts("playback")
    if not rows:
        return None
    return float((view.at - rows[-1]["event_time"]).total_seconds()) / 3600


@encoder(inputs=[facts("playback", window="7d")], output="int64")
def distinct_genres_7d(view: View) -> int:
    """How many different genres the member played in the last 7 days."""
    return len({f["genre"] for f in view.facts("playback") if f["genre"] is not None})


@encoder(inputs=[facts("recommendation_request", window="1d")], output="int64")
def requests_1d(view: View) -> int:
    """Recommendation requests in the last day, this one included (fatigue)."""
    return len(view.facts("recommendation_request"))


@encoder(inputs=[facts("impression", window="7d"), facts("playback", window="7d")],
         output="float64")
def rec_play_rate_7d(view: View) -> float | None:
    """Plays that came from a recommendation per recommendation shown, last 7 days."""
    shown = {f["request_id"] for f in view.facts("impression")}
    if not shown:
        return None
    played = {f["request_id"] for f in view.facts("playback")
              if f["source"] == "recommendation" and f["request_id"] in shown}
    return len(played) / len(shown)


@encoder(inputs=[snapshot("viewing_history")], output="float64")
def genre_affinity(view: View) -> float | None:
    """Share of the member's recent plays in their most played genre (snapshot-fed)."""
    hist: dict[str, Any] | None = view.snapshot("viewing_history")
    if not hist or not hist.get("recent"):
        return None
    genres = Counter(p["genre"] for p in hist["recent"])
    return max(genres.values()) / sum(genres.values())


@encoder(inputs=[snapshot("my_list")], output="int64")
def my_list_size(view: View) -> int | None:
    """Titles on the member's list (snapshot-fed)."""
    lst = view.snapshot("my_list")
    return None if lst is None else int(lst["size"])


@encoder(inputs=[snapshot("profile")], output="int64")
def tenure_days(view: View) -> int | None:
    """Days since the member signed up (snapshot-fed)."""
    prof = view.snapshot("profile")
    return None if prof is None else int(prof["tenure_days"])
