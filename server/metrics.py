"""Prometheus metrics, in a registry of the app's own."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UTILIZATION_WINDOW = 30.0  # seconds of engine time the utilization gauge looks back over
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "image_server_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        # Capacity signals, per pod, for autoscalers and inference gateways (docs/DEPLOYMENT.md); no per-tenant
        # labels: their number would grow with the callers.
        self.queue_depth = Gauge("image_server_queue_depth", "requests waiting for the engine", registry=r)
        self.running = Gauge("image_server_running", "requests in the batch the engine is running", registry=r)
        self.utilization = Gauge(
            "image_server_utilization",
            f"share of the last {UTILIZATION_WINDOW:g} seconds the engine spent generating, from 0 to 1",
            registry=r,
        )
        self.oldest_wait = Gauge(
            "image_server_queue_oldest_seconds", "how long the longest-waiting queued request has waited", registry=r
        )
        self.in_flight = Gauge("image_server_in_flight", "requests accepted and not yet answered", registry=r)
        self.ready = Gauge(
            "image_server_ready", "1 when the model is loaded and the server is not draining", registry=r
        )
        self.batch_size = Histogram(
            "image_server_batch_size", "images per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r
        )
        self.queue_wait = self._seconds(
            "image_server_queue_wait_seconds", "time from acceptance to the start of generation"
        )
        self.generation = self._seconds(
            "image_server_generation_seconds", "time of the pipeline call that produced a request's images"
        )
        self.postprocess = self._seconds(
            "image_server_postprocess_seconds", "per-request time of plugins, encoding and delivery"
        )
        self.encode = self._seconds(
            "image_server_encode_seconds", "per-request time of encoding its images (part of post-processing)"
        )
        self.images = Counter("image_server_images", "images produced", registry=r)
        self.engine_errors = Counter("image_server_engine_errors", "pipeline calls that failed", registry=r)
        self.prep_switches = Counter(
            "image_server_prep_switches", "times the pipeline was re-prepared for another LoRA set", registry=r
        )
        self._isolation_counters()

    def _isolation_counters(self) -> None:
        """What the isolation limits did (docs/SECURITY.md): connections dropped, decode processes killed, input
        memory held."""
        r = self.registry
        self.dropped = Counter(
            "image_server_connections_dropped",
            "connections closed by the server for a deadline: header_timeout, body_timeout, write_timeout",
            ["reason"],
            registry=r,
        )
        self.decodes_killed = Counter(
            "image_server_decodes_killed",
            "decode processes killed and replaced: a body or image outlived DECODE_TIMEOUT or its request",
            registry=r,
        )
        self.input_memory = Gauge(
            "image_server_input_memory_bytes",
            "bytes of edits' decoded input pixels the requests hold, reserved from INPUT_MEMORY_MB",
            registry=r,
        )
        self.input_disk = Gauge(
            "image_server_input_disk_bytes",
            "bytes of callers' bodies and input images the requests hold in SPOOL_DIR, reserved from INPUT_DISK_MB",
            registry=r,
        )

    def _seconds(self, name: str, text: str) -> Histogram:
        return Histogram(name, text, buckets=_SECONDS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
