"""`make demo`, the OpenAI-compatible API: the server's models, then the demo adapters through the official
``openai`` client (every adapter is a model), one of them streamed.

Usage: python scripts/demo_openai.py BASE_URL PROMPT REF [REF ...]   (BASE_URL http://HOST:PORT/v1)
"""

from __future__ import annotations

import sys

from openai import OpenAI


def main(url: str, prompt: str, refs: list[str]) -> None:
    client = OpenAI(base_url=url, api_key="demo")  # the demo server runs --no-auth: any key will do
    print("models:", ", ".join(m.id for m in client.models.list()))
    for ref in refs:
        r = client.completions.create(model=ref, prompt=prompt, max_tokens=12, temperature=0)
        used = ", ".join(a["ref"] for a in r.adapters)  # type: ignore[attr-defined]  # hotswap's extra field
        print(f"{ref:>22} -> {used}: {prompt!r} -> {r.choices[0].text!r} ({r.usage.completion_tokens} tokens)")
    print(f"{refs[0]:>22} streamed: ", end="", flush=True)
    for chunk in client.completions.create(model=refs[0], prompt=prompt, max_tokens=12, temperature=0, stream=True):
        print(chunk.choices[0].text, end="|", flush=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
