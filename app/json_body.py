"""Read a JSON request body: bounded while it streams in, parsed as interoperable JSON (RFC 8259).

One home for the JSON form of ``POST /segment`` and for ``POST /cohorts``. The cap acts while the
bytes arrive (a client cannot make the API hold an unbounded body), and the parser is the strict
one (``worker/service/strictjson.py``): NaN, 1e999, lone surrogates and a name given twice are
JSON to Python but not to the LIMS that reads them back, so they are refused here with 422
before anything is stored.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from fprotoseg.app.errors import Problem
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.strictjson import StrictJSONError, loads_strict


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The body as a JSON value; 413 past ``max_bytes``, 400 when not JSON, 422 when not RFC 8259."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            detail = f"the JSON body is larger than {max_bytes} bytes"
            raise Problem(ErrorCode.INVALID_REQUEST, detail, status=413)
    try:
        return loads_strict(body)
    except StrictJSONError as exc:
        detail = f"the body is not interoperable JSON (RFC 8259): {exc}"
        raise Problem(ErrorCode.INVALID_REQUEST, detail) from None
    except ValueError:
        raise Problem(ErrorCode.INVALID_REQUEST, "the body is not valid JSON", status=400) from None
