"""A submitting client that behaves like a careful customer: each batch carries an Idempotency-Key
and is retried until the API answers it, so an API crash mid-request can lose nothing and create
nothing twice."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx


class SubmitFailed(RuntimeError):
    pass


@dataclass
class SubmitProgress:
    """How far a submission got: messages the API has answered for (accepted), batches retried."""

    accepted: int = 0
    retries: int = 0


async def submit_batches(api_url: str, key: str, numbers: list[str], *, batch: int = 100, concurrency: int = 2,
                         validity_s: int = 60, give_up_s: float = 120.0,
                         progress: SubmitProgress | None = None) -> list[str]:
    """Post one message per number in batches; returns the accepted ids in order. `progress`, when
    given, is updated as batches are answered (a fault scenario may strike mid-submission)."""
    progress = progress if progress is not None else SubmitProgress()
    batches = [numbers[i:i + batch] for i in range(0, len(numbers), batch)]
    results: list[list[str]] = [[] for _ in batches]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(batches)):
        queue.put_nowait(i)

    async def post(http: httpx.AsyncClient, index: int) -> None:
        body = {"messages": [{"to": n, "from": "faults", "text": f"code {n[-6:]}", "validity": validity_s}
                             for n in batches[index]]}
        headers = {"Idempotency-Key": f"fault-batch-{index}"}
        deadline = asyncio.get_running_loop().time() + give_up_s
        while True:
            try:
                r = await http.post("/v1/messages", json=body, headers=headers)
                if r.status_code == 202:
                    results[index] = [m["id"] for m in r.json()["messages"]]
                    progress.accepted += len(results[index])
                    return
                if r.status_code < 500 and r.status_code != 429:
                    raise SubmitFailed(f"batch {index}: {r.status_code} {r.text[:200]}")
            except httpx.TransportError:
                pass  # the API is down or restarting: retry with the same key
            if asyncio.get_running_loop().time() > deadline:
                raise SubmitFailed(f"batch {index}: no answer within {give_up_s}s")
            progress.retries += 1
            await asyncio.sleep(0.5)

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            await post(http, queue.get_nowait())

    async with httpx.AsyncClient(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return [i for ids in results for i in ids]
