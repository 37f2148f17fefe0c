"""A minimal self-hosted ChatKit server (openai-chatkit + FastAPI) for chatkit-gate.

`respond()` streams a fixed answer in chunks and never calls OpenAI, so it runs anywhere. The
gate in front of it authenticates the user and hands the identity over in headers
(`x-auth-request-user`, ...), which become the request context here.

    pip install -r tests/requirements.txt
    python3 examples/chatkit-server/server.py --port 3000

Knobs (environment): CHATKIT_CHUNKS (default 5) and CHATKIT_CHUNK_DELAY_MS (default 50) shape
the answer; a message whose text starts with `stream:<chunks>:<delay_ms>` overrides both for
that answer (tests use it for long streams).

For tests it also answers `GET /_test/state`: every ChatKit request it received (type, user,
thread id) and how many answers were cancelled by a client disconnect. This server's store
does NOT scope threads by user, on purpose: it shows the gate's thread-ownership check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from datetime import datetime
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from chatkit.server import ChatKitServer, StreamingResult
from chatkit.store import NotFoundError, Store
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    Attachment,
    Page,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
    UserMessageTextContent,
)

STATE: dict[str, Any] = {"requests": [], "cancelled": 0, "completed": 0, "active": 0}


class MemoryStore(Store[dict]):
    """Threads and items in memory (one process, for examples and tests)."""

    def __init__(self) -> None:
        self.threads: dict[str, ThreadMetadata] = {}
        self.items: dict[str, list[ThreadItem]] = {}
        self.attachments: dict[str, Attachment] = {}

    async def load_thread(self, thread_id: str, context: dict) -> ThreadMetadata:
        if thread_id not in self.threads:
            raise NotFoundError(f"thread {thread_id} not found")
        return self.threads[thread_id]

    async def save_thread(self, thread: ThreadMetadata, context: dict) -> None:
        self.threads[thread.id] = thread
        self.items.setdefault(thread.id, [])

    async def load_thread_items(self, thread_id, after, limit, order, context) -> Page[ThreadItem]:
        items = list(self.items.get(thread_id, []))
        if order == "desc":
            items.reverse()
        if after:
            ids = [i.id for i in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        return Page(data=items[:limit], has_more=len(items) > limit, after=items[limit - 1].id if len(items) > limit else None)

    async def save_attachment(self, attachment: Attachment, context: dict) -> None:
        self.attachments[attachment.id] = attachment

    async def load_attachment(self, attachment_id: str, context: dict) -> Attachment:
        return self.attachments[attachment_id]

    async def delete_attachment(self, attachment_id: str, context: dict) -> None:
        self.attachments.pop(attachment_id, None)

    async def load_threads(self, limit, after, order, context) -> Page[ThreadMetadata]:
        threads = sorted(self.threads.values(), key=lambda t: t.created_at, reverse=order == "desc")
        return Page(data=threads[:limit], has_more=len(threads) > limit)

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: dict) -> None:
        self.items.setdefault(thread_id, []).append(item)

    async def save_item(self, thread_id: str, item: ThreadItem, context: dict) -> None:
        items = self.items.setdefault(thread_id, [])
        for i, old in enumerate(items):
            if old.id == item.id:
                items[i] = item
                return
        items.append(item)

    async def load_item(self, thread_id: str, item_id: str, context: dict) -> ThreadItem:
        for item in self.items.get(thread_id, []):
            if item.id == item_id:
                return item
        raise NotFoundError(f"item {item_id} not found")

    async def delete_thread(self, thread_id: str, context: dict) -> None:
        self.threads.pop(thread_id, None)
        self.items.pop(thread_id, None)

    async def delete_thread_item(self, thread_id: str, item_id: str, context: dict) -> None:
        self.items[thread_id] = [i for i in self.items.get(thread_id, []) if i.id != item_id]


def _shape(message: UserMessageItem | None) -> tuple[int, float]:
    chunks = int(os.environ.get("CHATKIT_CHUNKS", "5"))
    delay = int(os.environ.get("CHATKIT_CHUNK_DELAY_MS", "50"))
    if message is not None:
        text = "".join(c.text for c in message.content if isinstance(c, UserMessageTextContent))
        if text.startswith("stream:"):
            parts = text.split(":")
            chunks, delay = int(parts[1]), int(parts[2])
    return chunks, delay / 1000.0


class FixedAnswerServer(ChatKitServer[dict]):
    """Answers every message with the same text, one chunk at a time."""

    async def respond(
        self, thread: ThreadMetadata, input_user_message: UserMessageItem | None, context: dict
    ) -> AsyncIterator[ThreadStreamEvent]:
        chunks, delay = _shape(input_user_message)
        item_id = self.store.generate_item_id("message", thread, context)
        item = AssistantMessageItem(id=item_id, thread_id=thread.id, created_at=datetime.now(), content=[])
        yield ThreadItemAddedEvent(item=item)
        text = ""
        STATE["active"] += 1
        try:
            for i in range(chunks):
                await asyncio.sleep(delay)
                delta = f"chunk {i} "
                text += delta
                yield ThreadItemUpdatedEvent(
                    item_id=item_id,
                    update=AssistantMessageContentPartTextDelta(content_index=0, delta=delta),
                )
        except (asyncio.CancelledError, GeneratorExit):
            STATE["cancelled"] += 1
            raise
        finally:
            STATE["active"] -= 1
        STATE["completed"] += 1
        item.content = [AssistantMessageContent(text=text)]
        yield ThreadItemDoneEvent(item=item)


server = FixedAnswerServer(MemoryStore())
app = FastAPI()


@app.post("/chatkit")
async def chatkit_endpoint(request: Request) -> Response:
    body = await request.body()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {}
    params = parsed.get("params") or {}
    STATE["requests"].append(
        {
            "type": parsed.get("type"),
            "user": request.headers.get("x-auth-request-user"),
            "thread_id": params.get("thread_id") if isinstance(params, dict) else None,
            "bytes": len(body),
        }
    )
    context = {"user": request.headers.get("x-auth-request-user")}
    result = await server.process(body, context)
    if isinstance(result, StreamingResult):
        return StreamingResponse(result, media_type="text/event-stream")
    return Response(content=result.json, media_type="application/json")


@app.get("/_test/state")
async def test_state() -> JSONResponse:
    return JSONResponse(STATE)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
