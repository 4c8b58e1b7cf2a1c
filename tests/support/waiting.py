"""Waiting for a condition the test cannot be told about (a server's metric, a log line)."""

import time
from collections.abc import Callable
from concurrent.futures import Executor, Future

from bench.harness import scrape


def until(predicate, timeout: float = 120, what: str = "the condition") -> None:
    """Polls `predicate` until it holds; an AssertionError after `timeout` seconds (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def generations_accepted(url: str) -> float:
    """Generation requests a server has accepted: those in flight and those answered."""
    answered = scrape(url, "image_server_requests_total", 'route="/v1/images/generations"')
    return scrape(url, "image_server_in_flight") + answered


def submit_accepted(pool: Executor, url: str, send: Callable[[dict], object], bodies: list[dict]) -> list[Future]:
    """Sends the bodies one at a time, each once the server has accepted the one before: when it returns, the
    server has accepted them all (a test that then signals the server knows what was accepted). The server must
    be idle when it starts; an answer lowers the count for a moment, which only makes a wait longer."""
    already = generations_accepted(url)
    futures = []
    for body in bodies:
        futures.append(pool.submit(send, body))
        wanted = already + len(futures)
        until(lambda: generations_accepted(url) >= wanted, what=f"request {len(futures)} accepted")  # noqa: B023
    return futures
