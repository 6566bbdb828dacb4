"""The fleet's scaling policy: up at once, down with hysteresis, to zero only after idle_s."""

from __future__ import annotations

import pytest

from workers.fleet.policy import ScalePolicy


def policy(**overrides) -> ScalePolicy:
    values = {"min_replicas": 0, "max_replicas": 4, "requests_per_replica": 10, "scale_down_after_s": 30.0,
              "idle_s": 120.0, **overrides}
    return ScalePolicy(**values)


def test_target_is_bounded_and_never_zero_while_work_is_outstanding():
    p = policy()
    assert [p.target(n) for n in (0, 1, 10, 11, 40, 10_000)] == [0, 1, 1, 2, 4, 4]
    assert policy(min_replicas=2).target(0) == 2


def test_scales_up_at_once():
    p = policy()
    assert p.desired(outstanding=35, current=0, now=0.0) == 4


def test_scales_down_only_after_the_smaller_size_sufficed_for_scale_down_after_s():
    p = policy()
    assert p.desired(5, current=4, now=0.0) == 4
    assert p.desired(5, current=4, now=29.0) == 4
    assert p.desired(5, current=4, now=30.0) == 1


def test_a_burst_of_work_resets_the_scale_down_timer():
    p = policy()
    p.desired(5, current=4, now=0.0)
    assert p.desired(40, current=4, now=20.0) == 4
    assert p.desired(5, current=4, now=40.0) == 4, "the timer restarted at 40 s"
    assert p.desired(5, current=4, now=70.0) == 1


def test_goes_to_zero_only_after_the_queue_stayed_empty_for_idle_s():
    p = policy()
    assert p.desired(0, current=2, now=0.0) == 2
    assert p.desired(0, current=2, now=119.0) == 2
    assert p.desired(15, current=2, now=119.5) == 2, "work came back: not idle any more"
    assert p.desired(0, current=2, now=120.0) == 2
    assert p.desired(0, current=2, now=239.9) == 2
    assert p.desired(0, current=2, now=240.0) == 0


def test_min_replicas_are_kept_when_idle():
    p = policy(min_replicas=1, idle_s=0.0)
    assert p.desired(0, current=3, now=0.0) == 1


def test_cap_counts_just_past_what_the_maximum_needs():
    p = policy()
    assert p.target(p.cap()) == p.max_replicas and p.target(p.cap() - 2) == p.max_replicas


@pytest.mark.parametrize("bad", [{"min_replicas": 5}, {"max_replicas": 0}, {"requests_per_replica": 0}])
def test_invalid_bounds_are_refused(bad):
    with pytest.raises(ValueError):
        policy(**bad)


def test_fleet_settings_hand_replicas_the_resolved_database_and_their_teacher(monkeypatch):
    from workers.fleet.settings import FleetSettings

    monkeypatch.delenv("TEACHERCACHE_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = FleetSettings(_env_file=None, max_replicas=3, max_inflight=64, lease_s=7.0, worker_id="not-shared")
    replica = settings.replica_settings("t1", "postgresql://db/x")
    assert (replica.teacher, replica.database_url, replica.lease_s) == ("t1", "postgresql://db/x", 7.0)
    assert replica.worker_id is None, "each replica makes its own worker id"
    assert not hasattr(replica, "max_replicas"), "replicas get worker settings only"
    assert settings.policy().requests_per_replica == 64, "default: what one worker holds"
    with pytest.raises(ValueError, match="min_replicas"):
        FleetSettings(_env_file=None, min_replicas=4, max_replicas=2)
