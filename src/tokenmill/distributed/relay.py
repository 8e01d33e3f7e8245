"""What the HTTP front sends back: a replica's stream relayed (a replica's death ends it with an error event), and
every replica's /metrics merged into one exposition."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import RayError

from tokenmill.server.metrics import exposition
from tokenmill.server.openai_errors import error_body

logger = logging.getLogger("tokenmill.distributed")


async def relayed(chunks) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except RayError as exc:
        logger.error("replica failed mid-stream: %s", exc)
        failure = error_body(503, f"the engine replica serving this request failed: {type(exc).__name__}")
        yield f"data: {json.dumps(failure)}\n\ndata: [DONE]\n\n".encode()


def merge_expositions(texts: dict[str, str]) -> bytes:
    """Each replica's /metrics, as one exposition with a `replica` label on every sample."""
    families = []
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            family.samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
            families.append(family)
    return exposition(families)
