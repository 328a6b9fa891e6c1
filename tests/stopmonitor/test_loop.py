"""stopmonitor/loop.py: the --loop of monitor_stops and publish_outbox."""

from __future__ import annotations

import os
import signal
import time

from stopmonitor.loop import Loop


def test_without_loop_the_body_runs_once_and_no_handler_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    assert list(Loop(False)) == [0]
    assert signal.getsignal(signal.SIGTERM) is before


def test_max_runs_and_last():
    loop = Loop(True, 3)
    seen = [(n, loop.last) for n in loop]
    assert seen == [(0, False), (1, False), (2, True)]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_signal_during_the_wait_returns_at_once():
    loop = Loop(True)
    try:
        runs = []
        for n in loop:
            runs.append(n)
            if n == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            started = time.monotonic()
            loop.wait(5)
            assert time.monotonic() - started < 1.0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert runs == [0] and loop.stopped
