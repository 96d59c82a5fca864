"""A multipart upload streamed straight to disk: memory stays flat whatever the size, and an upload past the
limit is refused while it streams (or before, from its Content-Length), never buffered first.

Starlette's own form parser spools a file part to a temporary file of any size before the route runs; this
one writes the `file` part to the caller's own file, hashing it as it goes, and stops at `max_bytes`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from ftops.portal.auth import ApiError

FIELD_LIMIT = 1024  # bytes of a plain form field (purpose)
MAX_PARTS = 8


@dataclass
class Upload:
    path: Path
    filename: str = ""
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"File too large: the limit is {limit} bytes.", "file_too_large", "file")


async def receive(request, path: Path, max_bytes: int, expect_purpose: str) -> Upload:
    """Parse the request body into `path` (the `file` part) and the small fields. Raises ApiError: 400 for a
    malformed form or a wrong `purpose` (as soon as it is read), 413 past `max_bytes`."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(400, "Expected a multipart/form-data upload with `file` and `purpose`.", "invalid_request")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + 64 * 1024:  # the form's own overhead is small
        raise too_large(max_bytes)
    up = Upload(path)
    digest = hashlib.sha256()
    state: dict = {"headers": {}, "field": None, "name": None, "buf": bytearray(), "parts": 0, "out": None}
    header = {"field": bytearray(), "value": bytearray()}

    def on_part_begin():
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise ApiError(400, "Too many form fields.", "invalid_request")
        state["headers"], state["name"], state["buf"] = {}, None, bytearray()

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        state["headers"][bytes(header["field"]).lower()] = bytes(header["value"])
        header["field"], header["value"] = bytearray(), bytearray()

    def on_headers_finished():
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == "file":
            if state["out"] is not None:
                raise ApiError(400, "Only one file per upload.", "invalid_request", "file")
            up.filename = disp.get(b"filename", b"").decode("utf-8", "replace")[:255]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            state["out"] = os.fdopen(fd, "wb")

    def on_part_data(data, start, end):
        if state["name"] == "file":
            chunk = data[start:end]
            up.size += len(chunk)
            if up.size > max_bytes:
                raise too_large(max_bytes)
            digest.update(chunk)
            state["out"].write(chunk)
        else:
            state["buf"] += data[start:end]
            if len(state["buf"]) > FIELD_LIMIT:
                raise ApiError(400, f"Form field {state['name']!r} too long.", "invalid_request")

    def on_part_end():
        if state["name"] != "file" and state["name"]:
            value = bytes(state["buf"]).decode("utf-8", "replace")
            up.fields[state["name"]] = value
            if state["name"] == "purpose" and value != expect_purpose:
                raise ApiError(
                    400,
                    f"Invalid purpose {value[:40]!r}: only {expect_purpose!r} is accepted.",
                    "invalid_purpose",
                    "purpose",
                )

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        raise
    except Exception as exc:  # python_multipart's parse errors: a malformed body
        raise ApiError(400, f"Malformed multipart body ({type(exc).__name__}).", "invalid_request") from exc
    finally:
        if state["out"] is not None:
            state["out"].close()
    if state["out"] is None:
        raise ApiError(400, "Missing `file`.", "invalid_request", "file")
    if up.fields.get("purpose") != expect_purpose:
        raise ApiError(
            400, f"Missing or invalid purpose: only {expect_purpose!r} is accepted.", "invalid_purpose", "purpose"
        )
    up.sha256 = digest.hexdigest()
    return up
