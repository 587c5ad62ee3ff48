"""The OpenAI-compatible API in Ray mode, on a real local Ray (2 CPUs): the ``openai`` client against Ray Serve's
HTTP proxy, through the FastAPI ingress, to two engine replicas routed by adapter (Ray's model multiplexing)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from hotswap.basemodel import fingerprint
from hotswap.client import Client
from hotswap.registry import Registry
from hotswap.serve import Engine, EngineConfig, Request
from hotswap.serve.api.config import ServerConfig
from hotswap.train import RandomLoraConfig, random_bitfit, random_loras
from tests.serve.serverutil import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
scaleout = pytest.importorskip("hotswap.serve.api.scaleout")

pytestmark = pytest.mark.slow
ADAPTERS = ["a0", "a1", "a2", "a3"]
PROMPTS = [[5, 17, 99, 3], [42, 7]]
LIMITS = {"max_batch": 8, "max_seq_len": 512, "max_resident": 8}


@pytest.fixture(scope="module")
def registry(tiny_base: Path, other_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("http-ray")
    reg = Registry(d / "registry")
    fp = fingerprint(tiny_base)
    for path in random_loras(tiny_base, {d / a: i + 1 for i, a in enumerate(ADAPTERS)}, RandomLoraConfig(rank=4)):
        reg.publish(path, path.name, base_fingerprint=fp)
    reg.publish(
        random_bitfit(other_base, d / "elsewhere", seed=9), "elsewhere", base_fingerprint=fingerprint(other_base)
    )
    return d / "registry"


@pytest.fixture(scope="module")
def cluster(tiny_base: Path, registry: Path) -> Iterator[tuple[str, str]]:
    """Ray with hotswap on two replicas and the HTTP API; yields (OpenAI base URL, gRPC proxy address)."""
    scaleout.init_local_ray(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    http_port = free_port()
    config = ServerConfig(base=tiny_base, registry=str(registry), no_auth=True, http_port=http_port,
                          served_model_name="tiny", engine=EngineConfig(**LIMITS))  # fmt: skip
    options = scaleout.RayOptions(replicas=2, grpc_port=free_port(), http_port=http_port, replica_cpus=0.5)
    try:
        scaleout.start(config, options)
        yield f"http://127.0.0.1:{http_port}/v1", f"127.0.0.1:{options.grpc_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def test_the_openai_client_gets_the_engines_answers(cluster: tuple[str, str], tiny_base: Path, registry: Path) -> None:
    url, grpc_target = cluster
    jobs = [(a, p) for a in [*ADAPTERS, None] for p in PROMPTS]
    with Engine(tiny_base, registry, EngineConfig(**LIMITS)) as engine:
        want = [
            r.token_ids
            for r in engine.generate(
                [Request(prompt_ids=p, adapters=[a] if a else [], max_new_tokens=6) for a, p in jobs]
            )
        ]
        (weighted,) = engine.generate([Request(prompt_ids=PROMPTS[0], adapters=[("a1", 0.5), "a2"], max_new_tokens=5)])
    c = _client(url)
    assert [m.id for m in c.models.list()] == ["tiny", *ADAPTERS, "elsewhere"]
    got = [
        c.completions.create(model=a or "tiny", prompt=p, max_tokens=6, temperature=0).choices[0].token_ids
        for a, p in jobs
    ]
    assert got == want
    extra = {"adapters": [{"ref": "a1", "weight": 0.5}, {"ref": "a2"}]}  # routed by its first adapter
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=extra))  # fmt: skip
    assert [t for ch in chunks if ch.choices for t in ch.choices[0].token_ids] == weighted.token_ids
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == len(PROMPTS[0])
    with pytest.raises(openai.NotFoundError, match="nope"):
        c.completions.create(model="nope", prompt=PROMPTS[0])
    with pytest.raises(openai.ConflictError, match="base"):
        c.completions.create(model="elsewhere", prompt=PROMPTS[0])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=-1)
    # gRPC keeps working beside it: with two applications, the client names its own
    with Client(grpc_target, timeout=120, application=scaleout.APP) as g:
        assert g.generate(prompt_ids=PROMPTS[0], adapters=["a0"], max_new_tokens=6).token_ids == want[0]


def _ask(c: openai.OpenAI, adapter: str) -> tuple[str, int]:
    """(replica, adapter loads on it so far) from the headers of one completion."""
    raw = c.completions.with_raw_response.create(model=adapter, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    return raw.headers[scaleout.REPLICA_KEY], int(raw.headers[scaleout.LOADS_KEY])


def test_requests_follow_their_adapter(cluster: tuple[str, str]) -> None:
    """After warm-up, every completion lands on a replica already holding its adapter: no replica loads again."""
    c = _client(cluster[0])
    loads: dict[str, int] = {}
    for adapter in ADAPTERS:  # warm-up: each adapter loaded somewhere (maybe already, by the test above)
        replica, n = _ask(c, adapter)
        loads[replica] = n
    time.sleep(1)  # replicas report what they hold to Ray's routers asynchronously
    warm = dict(loads)
    for _ in range(4):
        for adapter in ADAPTERS:
            replica, n = _ask(c, adapter)
            loads[replica] = n
    assert loads == warm, "a repeated adapter was loaded again"
    assert sum(loads.values()) <= 2 * len(ADAPTERS)


def test_the_http_application_builds_from_serve_config_args(tiny_base: Path, registry: Path) -> None:
    from ray.serve import Application

    app = scaleout.build_http_app({"base": str(tiny_base), "registry": str(registry), "no_auth": True})
    assert isinstance(app, Application)
