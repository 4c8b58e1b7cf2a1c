"""Behind a connection balancer (a Kubernetes Service balances connections, not requests), a full pod's 429
closes the connection, so the SDK's retry reconnects and lands on another pod."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from tests.support.balancer import RoundRobin
from tests.support.waiting import until

SLOW = {"prompt": "slow", "size": "1024x1024", "num_inference_steps": 28}


def test_a_full_pods_429_is_retried_on_another_pod(make_server):
    full = make_server({"MAX_QUEUE": "1", "MAX_BATCH": "1"})
    idle = make_server()
    with ThreadPoolExecutor(2) as pool:  # the first pod: one request running, then one queued

        def post():
            return pool.submit(httpx.post, full.url + "/v1/images/generations", json=SLOW, timeout=300)

        busy = [post()]
        until(lambda: full.metric("image_server_running") == 1)  # sent together, the second could find it queued
        busy.append(post())
        until(lambda: full.metric("image_server_queue_depth") == 1)
        with RoundRobin([full.port, idle.port]) as balancer:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{balancer.port}/v1", api_key="x", max_retries=2)
            result = client.images.generate(prompt="hello", size="64x64", extra_body={"num_inference_steps": 2})
        assert all(f.result().status_code == 200 for f in busy)
    assert result.data[0].b64_json
    assert balancer.connections == [full.port, idle.port]  # the retry opened a new connection, to the other pod
    assert full.metric("image_server_requests_total", 'status="429"') == 1
    assert idle.metric("image_server_requests_total", 'route="/v1/images/generations",status="200"') == 1
