"""The aggregator's inbox holds at most max_bytes of payloads: a faster sender waits."""

from __future__ import annotations

import threading

from aggregator.inbox import Inbox
from fedcore.transport.base import Connected, MessageReceived


def msg(n: int) -> MessageReceived:
    return MessageReceived("fg/f/t/update/d", b"x" * n, False)


def test_events_come_out_in_order_and_the_bytes_are_released() -> None:
    inbox = Inbox(100)
    inbox.put(Connected(session_present=False))
    inbox.put(msg(60))
    inbox.put(msg(40))
    assert inbox.held_bytes == 100 and len(inbox) == 3
    assert inbox.get(0.0) == Connected(session_present=False)
    assert inbox.get(0.0) == msg(60)
    assert inbox.get(0.0) == msg(40)
    assert inbox.held_bytes == 0 and inbox.get(0.0) is None
    assert inbox.peak_bytes == 100


def test_a_put_over_the_bound_waits_until_the_loop_takes_one() -> None:
    inbox = Inbox(100)
    inbox.put(msg(80))
    done = threading.Event()

    def sender() -> None:
        inbox.put(msg(80))
        done.set()

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    assert not done.wait(0.3)  # blocked: 160 bytes would be held
    assert inbox.held_bytes == 80
    assert inbox.get(1.0) == msg(80)
    assert done.wait(10)
    t.join(10)
    assert inbox.held_bytes == 80 and inbox.peak_bytes == 80


def test_one_message_larger_than_the_bound_still_passes_an_empty_inbox() -> None:
    inbox = Inbox(10)
    inbox.put(msg(50))
    assert inbox.get(0.0) == msg(50)


def test_close_releases_a_blocked_put() -> None:
    inbox = Inbox(100)
    inbox.put(msg(80))
    done = threading.Event()

    def sender() -> None:
        inbox.put(msg(80))
        done.set()

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    assert not done.wait(0.3)
    inbox.close()  # the service stops: the network thread must be able to finish
    assert done.wait(10)
    assert len(inbox) == 1  # what came after the loop stopped is dropped
