"""Proxy-tuning (ours): a tuned small expert and its untuned anti-expert offset the base's logits per row."""

from __future__ import annotations

from hotswap.methods.api.spec import MethodSpec, RandomKnobs
from hotswap.methods.proxy.artifact import load_proxy, random_proxies
from hotswap.methods.proxy.train import ProxyOptions, attach_proxy


def _random(base, outs, knobs: RandomKnobs):
    if knobs.small is None:
        raise ValueError("proxy-tuning's synthetic artifacts need a small model sharing the base's vocabulary")
    return random_proxies(knobs.small(), outs)  # experts tuned from one small model (their shared anti-expert)


PROXY = MethodSpec(
    name="proxy",
    summary="decode-time logit offset alpha (expert - anti_expert) of a small tuned model",
    load=load_proxy,
    options=ProxyOptions,
    attach=lambda m, o, _: attach_proxy(m, o),
    lr=3e-3,
    random=_random,
)

__all__ = ["PROXY", "ProxyOptions", "random_proxies"]
