"""Buffered rounds end to end over a real Mosquitto: aggregator and gateway agents as processes.

Same fleet as tests/broker/test_federation.py, with the aggregator's `[rounds]` switched to
`mode = "buffered"`: the gateways learn the mode from the announcement alone.
"""

from __future__ import annotations

from tests.broker.test_federation import Run, run_factory

__all__ = ["run_factory"]  # the fixture, used by name below


def buffered(run: Run, buffer_size: int) -> None:
    text = run.files.aggregator.read_text().replace(
        "[rounds]\n", f'[rounds]\nmode = "buffered"\nbuffer_size = {buffer_size}\nmax_staleness = 3\nmin_interval_s = 0\n', 1)
    run.files.aggregator.write_text(text)


def test_a_buffered_run_publishes_a_version_per_buffer_and_survives_a_gateway_leaving(run_factory) -> None:
    run = run_factory(rounds=400, gateways=3, min_participants=2)
    buffered(run, buffer_size=2)
    run.start_all()
    seen = [run.next_summary() for _ in range(3)]
    assert [s.model_version for s in seen] == [s.round for s in seen]
    assert all(len(s.participants) == 2 for s in seen)  # K = 2
    # Three gateways, two places per version: work built on an older version is folded in
    # (how soon depends on who trains fastest, so up to 30 more versions are allowed for it).
    log = ""
    for _ in range(30):
        log = (run.tmp / "aggregator.log").read_text()
        if "folded with staleness" in log:
            break
        run.next_summary()
    assert "folded with staleness" in log
    victim = next(iter(run.files.edges))
    run.kill(victim)  # its last will says offline: the other two keep filling buffers
    later = [run.next_summary() for _ in range(8)]
    assert [s.round for s in later] == list(range(later[0].round, later[0].round + 8))
    # what it sent before it died may still count, within max_staleness (3) versions
    assert all(not any(p.endswith(victim) for p in s.participants) for s in later[4:])
    assert "Traceback" not in (run.tmp / "aggregator.log").read_text()
