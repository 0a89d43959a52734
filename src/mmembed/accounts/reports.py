"""Usage reports from the ledger: requests, tokens by kind, cost; by key, model, day or route
(``dashscope``, ``openai``, ``batch``...)."""

from __future__ import annotations

import calendar
import csv
import io
import json
import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, select

from mmembed.accounts import schema
from mmembed.accounts.keys import AccountsError
from mmembed.accounts.store import Store

GROUPS = ("key", "model", "day", "route")
COLUMNS = (
    "requests",
    "failed",
    "items",
    "input_tokens",
    "image_tokens",
    "image_count",
    "video_seconds",
    "cost_usd",
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_date(value: str, *, end: bool = False) -> float:
    """'YYYY-MM-DD' (UTC; as an end bound, the whole day is included) or an ISO 8601 time."""
    text = (value or "").strip()
    try:
        if _DATE.match(text):
            day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return calendar.timegm(day.timetuple()) + (86400 if end else 0)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AccountsError(
            f"invalid date {value!r}: use YYYY-MM-DD or an ISO 8601 time like 2026-11-24T10:00Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def usage(
    store: Store,
    *,
    key: str | None = None,
    route: str | None = None,
    since: float | None = None,
    until: float | None = None,
    by: str = "key",
) -> list[dict[str, Any]]:
    if by not in GROUPS:
        raise AccountsError(f"--by must be one of {', '.join(GROUPS)}, got {by!r}")
    t = schema.ledger
    group = {"key": t.c.key_name, "model": t.c.model, "day": t.c.day, "route": t.c.route}[by]
    query = select(
        group.label("group"),
        func.count().label("requests"),
        func.sum(case((t.c.status != 200, 1), else_=0)).label("failed"),
        func.sum(t.c["items"]).label("items"),
        func.sum(t.c.input_tokens).label("input_tokens"),
        func.sum(t.c.image_tokens).label("image_tokens"),
        func.sum(t.c.image_count).label("image_count"),
        func.sum(t.c.video_seconds).label("video_seconds"),
        func.sum(t.c.cost).label("cost_usd"),
    ).group_by(group)
    if key is not None:
        query = query.where(t.c.key_name == key)
    if route is not None:
        query = query.where(t.c.route == route)
    if since is not None:
        query = query.where(t.c.ts >= since)
    if until is not None:
        query = query.where(t.c.ts < until)
    with store.read() as conn:
        rows = conn.execute(query.order_by(group)).all()
    out = []
    for r in rows:
        item: dict[str, Any] = {by: r.group}
        for col in COLUMNS:
            v = getattr(r, col) or 0
            item[col] = round(float(v), 12) if col in ("cost_usd", "video_seconds") else int(v)
        out.append(item)
    return out


def render(rows: list[dict[str, Any]], by: str, fmt: str) -> str:
    header = [by, *COLUMNS]
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=False)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    cells = [[_fmt(r[c], c) for c in header] for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    if not rows:
        lines.append("(no requests in this range)")
    return "\n".join(lines)


def _fmt(value: Any, column: str) -> str:
    if column == "cost_usd":
        return f"{value:.6f}"
    if column == "video_seconds":
        return f"{value:g}"
    return str(value)
