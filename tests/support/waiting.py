"""Waiting for a condition the test cannot be told about (a server's metric, a log line)."""

import time


def until(predicate, timeout: float = 120, what: str = "the condition") -> None:
    """Polls `predicate` until it holds; an AssertionError after `timeout` seconds (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
