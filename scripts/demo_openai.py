"""`make demo`, the OpenAI-compatible API: the server's models, then one chat asked of each ref through the official
``openai`` client (every adapter is a model; "base" is the base model), the first one streamed.

Usage: python scripts/demo_openai.py BASE_URL SYSTEM USER REF [REF ...]   (BASE_URL http://HOST:PORT/v1)
"""

from __future__ import annotations

import sys

from openai import OpenAI


def main(url: str, system: str, user: str, refs: list[str]) -> None:
    client = OpenAI(base_url=url, api_key="demo")  # the demo server runs --no-auth: any key will do
    print("models:", ", ".join(m.id for m in client.models.list()))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    print(f"user: {user!r}")
    for ref in refs:
        r = client.chat.completions.create(model=ref, messages=messages, max_tokens=48, temperature=0)
        used = ", ".join(a["ref"] for a in r.adapters) or "base"  # type: ignore[attr-defined]  # hotswap's field
        answer = r.choices[0].message.content
        print(f"{ref:>14} -> {used}: {answer!r} ({r.usage.completion_tokens} tokens, {r.choices[0].finish_reason})")
    print(f"{refs[0]:>14} streamed: ", end="", flush=True)
    stream = client.chat.completions.create(model=refs[0], messages=messages, max_tokens=48, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="|", flush=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
