"""50 concurrent clients for 60 s on 10 sandboxes that keep pausing, stopping and waking:
no request fails, and the daemon's memory and open files stay flat (figures: `make bench`)."""

import asyncio
import json
from pathlib import Path

from bench.load import new_daemon, run_load

OUTPUT = Path(__file__).resolve().parents[2] / ".cache" / "test-output"


def test_fifty_clients_for_a_minute(default_image):
    d = new_daemon()
    try:
        d.start()
        # a first round brings the daemon to its working size (allocator high-water marks, pools);
        # the measured round must then neither fail nor grow it
        first = asyncio.run(run_load(d, clients=50, duration=20))
        res = asyncio.run(run_load(d, clients=50, duration=60))
    finally:
        d.scrub()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    summary = {
        op: {"n": len(v), "p99_ms": round(sorted(v)[int(len(v) * 0.99) - 1] * 1000, 1) if v else None}
        for op, v in res.latencies.items()
    }
    (OUTPUT / "load.json").write_text(
        json.dumps(
            {
                "ops": summary,
                "rss": [res.rss_before, res.rss_after],
                "fds": [res.fds_before, res.fds_after],
                "pauses": res.pauses,
                "first_round_rss": [first.rss_before, first.rss_after],
                "wakes": res.wakes,
            }
        )
    )
    assert res.failures == [], res.failures[:20]
    assert all(len(v) > 50 for v in res.latencies.values()), summary
    assert res.pauses > 0 and res.wakes > 0  # the thermal manager really paused and stopped them under load
    assert res.fds_after <= res.fds_before + 10, (res.fds_before, res.fds_after)
    assert res.rss_after <= res.rss_before * 1.2 + (20 << 20), (res.rss_before, res.rss_after)
