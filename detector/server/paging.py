"""Paging of ``ListRuns`` and ``GetTimeline`` (AIP-158): page sizes, opaque tokens, byte limits."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

from detector.errors import InvalidArgument

# (default, maximum) page sizes. Whatever the size, a page is cut before it
# exceeds PAGE_BYTES, so that it fits any client's default 4 MiB receive limit.
LIST_RUNS_PAGE = (500, 1000)
TIMELINE_PAGE = (1000, 10_000)
PAGE_BYTES = 2 * 1024 * 1024


def _page_size(asked: int, sizes: tuple[int, int]) -> int:
    if asked < 0:
        raise InvalidArgument(f"page_size must not be negative, got {asked}")
    return sizes[0] if asked == 0 else min(asked, sizes[1])


def _to_token(kind: str, scope: str, position: str) -> str:
    """An opaque page token: where the next page starts, and what it pages."""
    text = json.dumps([kind, scope, position])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _from_token(token: str, kind: str, scope: str) -> str | None:
    """The position in a token from ``_to_token``; None for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        found_kind, found_scope, position = json.loads(base64.urlsafe_b64decode(padded))
        if found_kind != kind or found_scope != scope or not isinstance(position, str):
            raise ValueError
        if kind == "e" and not (position.isdigit() and len(position) < 19):
            raise ValueError
    except (ValueError, TypeError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument(
            "page_token is not a next_page_token of this request (paging restarts without one)"
        ) from None
    return position


def _fill(field: Any, messages: Iterable[Any], used: int) -> int:
    """Append messages to a repeated field until the page holds PAGE_BYTES; how many.

    At least one goes in, whatever its size (label and evidence limits bound it)."""
    taken = 0
    for message in messages:
        size = message.ByteSize() + 8  # the field's tag and length
        if taken and used + size > PAGE_BYTES:
            break
        field.append(message)
        used += size
        taken += 1
    return taken
