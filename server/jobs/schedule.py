"""When to ask DashScope about a task next, and when it is expected to finish.

DashScope runs one task per model and account at a time and queues the rest; a task's run time
grows with its output (an EMO video is as long as its audio). So each open task gets an
expected start (when the task ahead of it in this account's queue for its model is expected to
end, or when it was seen RUNNING) and an expected end (start + output seconds × the model's
processing rate). The rate is learned from this ledger's finished tasks (`scheduled_time` to
`end_time` per `usage.video_duration`), starting from the contract's prior.

`adaptive` (the default) leaves a task that waits behind others alone until its expected start
(at least the base interval, at most `EMO_MCP_POLL_MAX_INTERVAL`): the end of the task ahead of it
brings its next query forward anyway. A running task is asked about next just before its
expected end, then densely (an eighth of `EMO_MCP_POLL_INTERVAL`) through a window around it,
backing off to the base interval when it overruns.
`fixed` queries every `EMO_MCP_POLL_INTERVAL`, as before. Either way no open task waits longer
than the maximum interval, so a surprise is caught.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from server.models import EMO_GENERATE, EMOJI_GENERATE
from server.store.queue import Entry, Rate

Schedule = Literal["adaptive", "fixed"]

# Processing seconds per output second before this ledger has learned better: the contract's one
# emo-v1 example (13.93 s of video in ~118 s) and emoji-v1's "runs 1–5 min" for ~5 s of output.
PRIOR_RATE = {EMO_GENERATE: 8.5, EMOJI_GENERATE: 36.0}
FALLBACK_RATE = 10.0
# How many output seconds the prior counts for: learned tasks outweigh it after about this much.
PRIOR_WEIGHT_SECONDS = 20.0
# The dense window around an expected end, as a share of the expected run time.
SPREAD = 0.15
MIN_DENSE = 0.2
_BEIJING = timezone(timedelta(hours=8))

# The watcher counts the tasks ahead of one only this far ("100+"): the estimate needs "none" or
# "some", and counting a deep queue on every query would cost its depth each time.
AHEAD_COUNTED = 100


def parse_beijing(text: str | None) -> float | None:
    """DashScope's task timestamps (`2025-09-11 14:33:38.716`, Beijing time) as epoch seconds."""
    if not text:
        return None
    for pattern in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(text, pattern).replace(tzinfo=_BEIJING).timestamp()
        except ValueError:
            continue
    return None


def learned_rate(model: str, rate: Rate, *, prior: bool) -> tuple[float | None, str]:
    """Seconds of processing per output second, and how it was reckoned.

    The contract's prior describes DashScope itself; another upstream (a proxy, a fake, the sandbox)
    starts from nothing known, and is polled at the base interval until its tasks have taught a rate.
    """
    if not prior:
        if rate.finished == 0 or rate.output_seconds <= 0:
            return None, "no finished task to learn this model's rate from yet"
        value = rate.run_seconds / rate.output_seconds
        return value, f"{value:.2f} s per output second (learned from {rate.finished} finished task(s))"
    guess = PRIOR_RATE.get(model, FALLBACK_RATE)
    value = (guess * PRIOR_WEIGHT_SECONDS + rate.run_seconds) / (PRIOR_WEIGHT_SECONDS + rate.output_seconds)
    if rate.finished == 0:
        return value, f"{value:.1f} s per output second (prior from the contract)"
    return value, f"{value:.1f} s per output second (learned from {rate.finished} finished task(s))"


@dataclass(frozen=True)
class Eta:
    start: float | None
    end: float | None
    basis: str
    queued: bool = False  # waiting behind other tasks of its model


def estimate(
    entry: Entry,
    *,
    now: float,
    status: str,
    scheduled: float | None,
    ahead_end: float | None,
    ahead_count: int,
    rate: float | None,
    rate_basis: str,
) -> Eta:
    """Expected start and end of one open task."""
    start: float | None
    if status == "RUNNING" or scheduled is not None:
        start = scheduled if scheduled is not None else (entry.expected_start or now)
        where = "running since it was scheduled" if scheduled is not None else "running"
    elif ahead_count == 0:
        start, where = now, "next in this account's queue"
    else:
        start = max(now, ahead_end) if ahead_end is not None else None
        more = "+" if ahead_count >= AHEAD_COUNTED else ""
        where = f"{ahead_count}{more} task(s) of {entry.model} ahead in this account's queue"
    queued = status != "RUNNING" and scheduled is None and ahead_count > 0
    if entry.expected_seconds is None or rate is None:
        return Eta(start, None, f"{where}; {rate_basis if rate is None else 'output length unknown'}", queued)
    if start is None:
        return Eta(None, None, f"{where}, whose end is not known; output {entry.expected_seconds:g} s", queued)
    end = start + entry.expected_seconds * rate
    return Eta(start, end, f"{where}; output {entry.expected_seconds:g} s at {rate_basis}", queued)


# A query counted from its due time (`keep_cadence`) still comes at least this share of its delay after
# the answer before it.
CADENCE_FLOOR = 0.75


def next_query(
    *,
    schedule: Schedule,
    began: float,
    eta: Eta | None,
    interval: float,
    max_interval: float,
) -> float:
    """When (epoch seconds) the task should be asked about next; `began` is when this query started."""
    if schedule == "fixed" or eta is None:
        return began + min(interval, max_interval)
    if eta.queued:
        # Behind others: its expected start, at least the base interval (which is also what an
        # unknown start gets: nothing is known); the end of the task ahead brings this forward
        # (Watcher._learn), so a late estimate costs nothing.
        wait = (eta.start - began) if eta.start is not None else interval
        return began + min(max_interval, max(interval, wait))
    if eta.end is None:
        return began + min(interval, max_interval)
    dense = max(min(interval, MIN_DENSE), interval / 8)
    run = max(0.0, eta.end - (eta.start if eta.start is not None else began))
    window = max(dense, SPREAD * run)
    remaining = eta.end - began
    if remaining > window:
        delay = remaining - window
    elif remaining > -window:
        delay = dense
    else:
        # Overrun: the estimate was wrong. Back off towards the base interval.
        overrun = -remaining - window
        delay = min(interval, dense * (2 ** min(8.0, overrun / window)))
    return began + min(delay, max_interval)


def keep_cadence(due: float, *, began: float, was_due: float, now: float) -> float:
    """`due` (from `next_query`, counted from `began`) counted from `was_due` instead, the due time the
    query answered, so a task asked a little early (a tick claims what falls due before the next tick)
    or late (its turn at the rate limit) is still asked once per delay, not once per delay plus the
    lag: 500 tasks at a 0.5 s interval and 20 ms of lag were 0.96 queries per interval, not 1.00.

    However late the query was, the next one comes at least CADENCE_FLOOR of the delay after `now`,
    when its answer is in: counted from its start instead, a query whose request reached DashScope
    late (a stalled event loop, a busy upstream) could be followed by another worker's within half
    an interval (seen at the bench's fake), and a backlog would be paid back in a burst."""
    delay = due - began
    if delay <= 0:
        return due
    return max(was_due + delay, now + CADENCE_FLOOR * delay)
