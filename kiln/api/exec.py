"""Route: POST /sandboxes/:id/exec, buffered JSON or NDJSON streamed line by line."""

from __future__ import annotations

import codecs
import json
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictStr

from ..core.errors import KilnError
from ..core.exec import ExecRequest
from ..store.db import User
from .auth import require_user
from .deps import services
from .models import DetachedOut, ExecOut

router = APIRouter()
log = logging.getLogger("kiln.exec")
NDJSON = "application/x-ndjson"


class ExecBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    cmd: list[StrictStr] = []
    timeout_sec: int | None = None
    env: dict[StrictStr, StrictStr] = {}
    cwd: StrictStr | None = None
    user: StrictStr | int | None = None
    stdin: StrictStr | None = None
    detach: bool = False
    output_file: StrictStr | None = None


def line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


@router.post("/sandboxes/{sandbox_id}/exec", response_model=ExecOut | DetachedOut, response_model_exclude_none=True)
async def exec_command(sandbox_id: str, body: ExecBody, request: Request, user: User = Depends(require_user)):
    execs = services(request).exec
    req = ExecRequest(**body.model_dump())
    if req.detach:
        return await execs.detached(user, sandbox_id, req)
    if request.headers.get("accept") != NDJSON:
        result = await execs.buffered(user, sandbox_id, req)
        out = {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}
        if result.timed_out:
            out["timed_out"] = True
        return out

    events = await execs.events(user, sandbox_id, req)

    async def stream():
        # a UTF-8 character may be split across chunks: decode each stream incrementally
        decoders = {k: codecs.getincrementaldecoder("utf-8")(errors="replace") for k in ("stdout", "stderr")}
        try:
            async for ev in events:
                if ev.kind == "exit":
                    done = {"type": "exit", "exit_code": ev.exit_code}
                    if ev.timed_out:
                        done["timed_out"] = True
                    yield line(done)
                else:
                    text = decoders[ev.kind].decode(ev.data)
                    if text:
                        yield line({"type": ev.kind, "data": text})
        except Exception as e:  # headers are sent: the error goes in the stream (and the log)
            msg = getattr(e, "message", None) or "internal error"
            log.error("streamed exec in sandbox %s failed: %s", sandbox_id, e, exc_info=not isinstance(e, KilnError))
            yield line({"type": "error", "data": msg})
        finally:
            await events.aclose()

    return StreamingResponse(stream(), media_type=NDJSON, headers={"X-Content-Type-Options": "nosniff"})
