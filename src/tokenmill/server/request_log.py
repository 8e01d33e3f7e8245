"""One info line per finished request, as key=value pairs a log pipeline can parse.

Prompt text stays out unless the server runs with --log-prompts: prompts may carry user data.
"""
from __future__ import annotations

import logging

from tokenmill.outputs import RequestOutput

logger = logging.getLogger("tokenmill.server.requests")


def log_request(out: RequestOutput, *, prompt_text: str | None, log_prompts: bool, user: str | None) -> None:
    m = out.metrics
    arrival = m.get("arrival_time")
    fields: dict[str, object] = {
        "request_id": out.request_id,
        "prompt_tokens": len(out.prompt_token_ids),
        "cached_tokens": out.num_cached_tokens,
        "output_tokens": sum(len(c.token_ids) for c in out.outputs),
        "finish_reason": ",".join(c.finish_reason or "abort" for c in out.outputs),
        "ttft_s": _seconds(m.get("first_token_time"), arrival),
        "e2e_s": _seconds(m.get("finished_time"), arrival),
    }
    if user is not None:
        fields["user"] = user
    if log_prompts:
        fields["prompt"] = prompt_text if prompt_text is not None else out.prompt_token_ids
    logger.info("request finished %s", " ".join(f"{k}={v!r}" if isinstance(v, str) and k in ("prompt", "user")
                                                else f"{k}={v}" for k, v in fields.items()))


def _seconds(end: float | None, start: float | None) -> str:
    return "-" if end is None or start is None else f"{end - start:.4f}"
