"""First copies first: which requests a chunk server answers ELSEWHERE, on a hand-driven clock."""

from __future__ import annotations

import pytest

from node.first_copies import FirstCopies

A, B = "a" * 64, "b" * 64


def copies(window: float = 2.0):
    now = [0.0]
    return FirstCopies(window, clock=lambda: now[0]), now


def test_a_chunk_goes_to_one_peer_while_it_is_being_sent():
    first, now = copies()
    assert not first.defer(A, "p1")  # served: now being sent to p1
    assert first.defer(A, "p2")  # another peer waits
    assert not first.defer(B, "p2")  # another chunk is served
    now[0] = 100.0
    assert first.defer(A, "p3")  # still being sent (no end reported): no expiry


def test_others_are_deferred_for_the_window_after_the_copy_left():
    first, now = copies(window=2.0)
    assert not first.defer(A, "p1")
    now[0] = 5.0
    first.sent(A, "p1")
    now[0] = 6.9
    assert first.defer(A, "p2")
    now[0] = 7.1
    assert not first.defer(A, "p2")  # 2.1 s after the copy left: served


def test_the_same_peer_is_served_again():
    first, _ = copies()
    assert not first.defer(A, "p1")
    first.sent(A, "p1")
    assert not first.defer(A, "p1")


def test_a_failed_send_is_forgotten():
    first, _ = copies()
    assert not first.defer(A, "p1")
    first.failed(A, "p1")
    assert not first.defer(A, "p2")


def test_a_report_about_another_peer_changes_nothing():
    first, now = copies(window=1.0)
    assert not first.defer(A, "p1")
    first.sent(A, "p2")  # p2 was never being sent A
    first.failed(A, "p2")
    now[0] = 50.0
    assert first.defer(A, "p3")  # p1's copy is still in progress


def test_a_sent_time_in_the_future_counts_from_then():
    first, now = copies(window=1.0)
    assert not first.defer(A, "p1")
    first.sent(A, "p1", at=10.0)  # queued behind other chunks: leaves at t = 10
    now[0] = 10.5
    assert first.defer(A, "p2")
    now[0] = 11.5
    assert not first.defer(A, "p2")


def test_a_negative_window_is_refused():
    with pytest.raises(ValueError, match="window_seconds"):
        FirstCopies(-1.0)
