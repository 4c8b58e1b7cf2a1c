"""Where the server is in its life: loading, ready, draining, or waiting for its engine to come back.

One place decides readiness: the probes, the door of every request and the readiness gauge all read it.
"""

from server.engines.base import Engine
from server.errors import APIError, shutting_down, unavailable
from server.metrics import Metrics


class Lifecycle:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.loaded = False
        self.draining = False
        metrics.ready.set_function(lambda: 1 if self.serving else 0)

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if not self.loaded:
            return "loading"
        return "ready" if self.engine.healthy else "engine_restarting"

    @property
    def serving(self) -> bool:
        return self.state == "ready"

    def check_accepting(self) -> None:
        """The door of every request: 503 with Retry-After unless the server can take work."""
        state = self.state
        if state == "draining":
            raise shutting_down()
        if state == "loading":
            raise unavailable("The model is still loading; retry shortly.", "model_loading", 10)
        if state == "engine_restarting":
            raise unavailable(
                "The generation engine is restarting; retry shortly.", "engine_restarting", self.engine.retry_after
            )

    def not_ready(self) -> APIError:
        return unavailable(f"not ready: {self.state}", self.state, 5)
