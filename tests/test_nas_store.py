"""The reference NAS's database and retry policy, without the network."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronosd.nas.dispatcher import RetryPolicy, parse_retry_after
from chronosd.nas.store import AgentExistsError, NASStore, Outcome, hash_token


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NASStore]:
    opened = NASStore.open(tmp_path)
    yield opened
    opened.close()


def arm(store: NASStore, job_id: str, fire_epoch: float, dedup_key: str | None = None) -> str:
    result = store.provision(
        "alpha",
        job_id,
        fire_at=f"t{fire_epoch}",
        fire_epoch=fire_epoch,
        callback_url="http://agent.example",
        dedup_key=dedup_key,
        now=0.0,
    )
    return result.arm.schedule_id


def test_tokens_are_stored_hashed_and_found_by_the_token(store: NASStore) -> None:
    token = store.add_agent("alpha", "http://agent.example", now=1.0)
    raw = store.path.read_bytes()
    assert token.encode() not in raw
    assert store.agent_for_token(token) is not None
    assert store.agent_for_token(token + "x") is None
    assert hash_token(token) != token


def test_re_adding_an_agent_needs_rotate_token_and_then_replaces_the_token(
    store: NASStore,
) -> None:
    first = store.add_agent("alpha", "http://agent.example", now=1.0)
    with pytest.raises(AgentExistsError, match="--rotate-token"):
        store.add_agent("alpha", "http://agent.example", now=2.0)
    second = store.add_agent("alpha", "http://new.example", now=2.0, rotate_token=True)
    assert store.agent_for_token(first) is None
    agent = store.agent_for_token(second)
    assert agent is not None and agent.callback_url == "http://new.example"


def test_generations_are_never_reused_even_after_a_cancel(store: NASStore) -> None:
    arm(store, "j", 10.0)
    first = store.armed()[0]
    store.cancel("alpha", "j")
    arm(store, "j", 10.0)
    second = store.armed()[0]
    assert second.generation > first.generation
    # The delivery of the first arm must not remove the second.
    assert not store.mark_delivered(first, attempt=1, status_code=202, now=11.0)
    assert store.armed() == [second]


def test_retry_of_a_replaced_arm_leaves_the_new_arm_untouched(store: NASStore) -> None:
    arm(store, "j", 10.0)
    old = store.armed()[0]
    arm(store, "j", 50.0)
    assert not store.schedule_retry(
        old, attempt=1, next_attempt_at=11.0, status_code=500, error="HTTP 500", now=10.5
    )
    assert not store.dead_letter(old, attempt=1, status_code=500, error="HTTP 500", now=10.5)
    (current,) = store.armed()
    assert (current.fire_epoch, current.attempts, current.next_attempt_at) == (50.0, 0, 50.0)
    assert store.dead_letters() == []
    assert [d.outcome for d in store.deliveries()] == ["superseded", "superseded"]


def test_due_skips_busy_agents_and_earliest_looks_past_an_instant(store: NASStore) -> None:
    arm(store, "a", 1.0)
    arm(store, "b", 2.0)
    arm(store, "c", 30.0)
    assert [a.job_id for a in store.due(5.0, limit=10)] == ["a", "b"]
    assert [a.job_id for a in store.due(5.0, limit=1)] == ["a"]
    assert store.due(5.0, limit=10, skip_agents={"alpha"}) == []
    assert store.earliest_attempt_after(0.0) == 1.0
    assert store.earliest_attempt_after(1.0) == 2.0
    assert store.earliest_attempt_after(5.0) == 30.0
    assert store.earliest_attempt_after(30.0) is None


def test_same_dedup_key_keeps_the_arm_and_its_schedule_id(store: NASStore) -> None:
    first = arm(store, "j", 10.0, dedup_key="k")
    assert arm(store, "j", 99.0, dedup_key="k") == first
    assert store.armed()[0].fire_epoch == 10.0
    assert arm(store, "j", 99.0, dedup_key="k2") != first


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_cap=300.0)
    delays = [policy.delay(attempt, None) for attempt in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert policy.delay(10_000, None) == 300


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    retry_after=st.none() | st.floats(min_value=0, max_value=1e9),
)
def test_retry_delay_stays_between_base_and_cap(attempt: int, retry_after: float | None) -> None:
    policy = RetryPolicy(backoff_base=0.5, backoff_cap=300.0)
    assert 0.5 <= policy.delay(attempt, retry_after) <= 300.0


def test_retry_after_is_honoured_within_base_and_cap() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_cap=300.0)
    assert policy.delay(1, 7.0) == 7.0
    assert policy.delay(1, 0.0) == 1.0
    assert policy.delay(1, 3600.0) == 300.0


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert parse_retry_after("5", now=now) == 5.0
    assert parse_retry_after(None, now=now) is None
    assert parse_retry_after("soon", now=now) is None
    date = format_datetime(datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC), usegmt=True)
    assert parse_retry_after(date, now=now) == 30.0


def test_outcomes_written_together_apply_each_to_its_own_arm(store: NASStore) -> None:
    for job_id in ("ok", "again", "dead", "replaced"):
        arm(store, job_id, 10.0)
    arms = {a.job_id: a for a in store.armed()}
    arm(store, "replaced", 99.0)  # a new generation: the old delivery's outcome is superseded
    applied = store.record(
        [
            Outcome(arms["ok"], "delivered", 1, 11.0, 202),
            Outcome(arms["again"], "retry", 1, 11.0, 503, "HTTP 503", 12.0),
            Outcome(arms["dead"], "dead", 3, 11.0, None, "refused"),
            Outcome(arms["replaced"], "delivered", 1, 11.0, 202),
        ]
    )
    assert applied == [True, True, True, False]
    left = {a.job_id: a for a in store.armed()}
    assert set(left) == {"again", "replaced"}
    assert (left["again"].attempts, left["again"].next_attempt_at) == (1, 12.0)
    assert left["again"].last_error == "HTTP 503"
    assert left["replaced"].fire_epoch == 99.0
    assert [(d.job_id, d.outcome) for d in store.deliveries()] == [
        ("ok", "delivered"),
        ("again", "retry"),
        ("dead", "dead"),
        ("replaced", "superseded"),
    ]
    (dead,) = store.dead_letters()
    assert (dead.job_id, dead.attempts, dead.last_error) == ("dead", 3, "refused")


def test_two_stores_on_one_file_never_hand_out_the_same_generation(tmp_path: Path) -> None:
    first, second = NASStore.open(tmp_path), NASStore.open(tmp_path)
    try:
        generations = []
        for index in range(50):
            for which, opened in (("a", first), ("b", second)):
                result = opened.provision(
                    which,
                    f"j{index}",
                    fire_at="t",
                    fire_epoch=1.0,
                    callback_url="http://agent.example",
                    dedup_key=None,
                    now=0.0,
                )
                generations.append(result.arm.generation)
        assert len(set(generations)) == len(generations) == 100
    finally:
        first.close()
        second.close()
    reopened = NASStore.open(tmp_path)
    try:
        later = arm(reopened, "later", 1.0)
        assert later
        assert reopened.armed("alpha")[0].generation > max(generations)
    finally:
        reopened.close()


def test_token_lookup_sees_agents_changed_by_another_connection(tmp_path: Path) -> None:
    serving, cli = NASStore.open(tmp_path), NASStore.open(tmp_path)
    try:
        assert serving.agent_for_token("nobody") is None
        token = cli.add_agent("alpha", "http://agent.example", now=1.0)
        found = serving.agent_for_token(token)
        assert found is not None and found.name == "alpha"
        rotated = cli.add_agent("alpha", "http://new.example", now=2.0, rotate_token=True)
        assert serving.agent_for_token(token) is None
        found = serving.agent_for_token(rotated)
        assert found is not None and found.callback_url == "http://new.example"
        cli.remove_agent("alpha")
        assert serving.agent_for_token(rotated) is None
    finally:
        serving.close()
        cli.close()


def test_token_lookup_sees_agents_changed_through_the_same_store(store: NASStore) -> None:
    token = store.add_agent("alpha", "http://agent.example", now=1.0)
    assert store.agent_for_token(token) is not None
    store.remove_agent("alpha")
    assert store.agent_for_token(token) is None


def test_deferred_outcome_is_written_before_a_later_change_to_its_arm(store: NASStore) -> None:
    arm(store, "j", 10.0)
    (delivered,) = store.armed()
    store.defer(Outcome(delivered, "delivered", 1, 11.0, 202))
    # The agent re-arms the moment it has answered, before the dispatcher wrote anything.
    arm(store, "j", 86_410.0)
    assert [(d.job_id, d.outcome) for d in store.deliveries()] == [("j", "delivered")]
    (rearmed,) = store.armed()
    assert rearmed.fire_epoch == 86_410.0
    assert store.take_written() == [(Outcome(delivered, "delivered", 1, 11.0, 202), True)]
    assert store.take_written() == []


def test_deferred_outcomes_are_seen_by_every_read_and_written_in_one_go(
    store: NASStore,
) -> None:
    for job_id in ("a", "b", "c"):
        arm(store, job_id, 10.0)
    arms = store.armed()
    for index, each in enumerate(arms):
        store.defer(Outcome(each, "retry", 1, 11.0, 503, "HTTP 503", 20.0 + index))
    assert [a.next_attempt_at for a in store.armed()] == [20.0, 21.0, 22.0]
    assert [applied for _, applied in store.take_written()] == [True, True, True]
    store.flush()  # nothing deferred: nothing to do
    assert store.take_written() == []


def test_deferred_outcome_survives_a_failed_change_and_is_written_later(
    store: NASStore,
) -> None:
    store.add_agent("alpha", "http://agent.example", now=1.0)
    arm(store, "j", 10.0)
    (delivered,) = store.armed()
    store.defer(Outcome(delivered, "delivered", 1, 11.0, 202))
    with pytest.raises(AgentExistsError):
        store.add_agent("alpha", "http://agent.example", now=2.0)  # rolled back
    assert store.take_written() == []
    assert store.armed() == []
    assert [d.outcome for d in store.deliveries()] == ["delivered"]
    assert [applied for _, applied in store.take_written()] == [True]


def test_closing_the_store_writes_deferred_outcomes(tmp_path: Path) -> None:
    opened = NASStore.open(tmp_path)
    arm(opened, "j", 10.0)
    (delivered,) = opened.armed()
    opened.defer(Outcome(delivered, "delivered", 1, 11.0, 202))
    opened.close()
    reopened = NASStore.open(tmp_path)
    try:
        assert reopened.armed() == []
        assert [d.outcome for d in reopened.deliveries()] == ["delivered"]
    finally:
        reopened.close()
