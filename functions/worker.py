"""The generation worker's endpoints: claim work, report results.

Both are authenticated by the `X-Callback-Secret` header, compared in
constant time with GENERATION_CALLBACK_SECRET. While that is unset every
caller gets 403: the worker cannot be let in without a secret, and unlike
init-db (404 while unset) these routes are always deployed and known.

POST /api/worker/claim moves the oldest pending generations to processing
under a lease (the table is the queue: FOR UPDATE SKIP LOCKED). Each request
gets a claim id, so sql() retrying the statement after an unknown outcome
returns what the first attempt took instead of taking more. With an
`Idempotency-Key` the claim id comes from the key, so the worker itself can
repeat a claim whose answer it lost (its own timeout) and get the same
generations back instead of leaving them stranded until their lease ends.

POST /api/generations/{id}/result finishes a pending or processing
generation; a failure refunds its cost once. A result for a finished
generation answers 200 with it unchanged (the worker may repeat itself).
"""

from __future__ import annotations

import hmac
import uuid
from datetime import datetime
from typing import Literal, Self
from uuid import UUID

from pydantic import Field, model_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database import Forbidden
from database.model import Model
from functions import settings
from functions.app import build_app
from functions.http import RequestModel, idempotency_key, json_response, no_query_params, read_json
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint
from functions.views import Generation, generation_view
from repositories import generations

MAX_IMAGE_KEY_LENGTH = 1024  # S3's limit on object keys
MAX_ERROR_LENGTH = 2000
# claim ids made from the worker's Idempotency-Key: the same key, the same claim
CLAIM_KEYS = UUID("5b0e8a52-3c1f-4f0e-9d7a-2a6f4c1e8b93")


def check_callback_secret(request: Request) -> None:
    """403 unless X-Callback-Secret equals GENERATION_CALLBACK_SECRET (and it is set)."""
    expected = settings.generation_callback_secret()
    given = request.headers.get("x-callback-secret", "")
    if expected is None:
        raise Forbidden("Worker callbacks are disabled: GENERATION_CALLBACK_SECRET is not set")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8")):
        raise Forbidden("Wrong or missing X-Callback-Secret")


class Claim(RequestModel):
    limit: int = Field(default=10, ge=1, le=100, strict=True)
    lease_seconds: int = Field(default=300, ge=10, le=3600, strict=True)


class ClaimedGeneration(Model):
    id: UUID
    prompt: str
    quality: str
    attempt: int
    lease_expires_at: datetime  # report the result before then, or it returns to the queue


class ClaimedPage(Model):
    items: list[ClaimedGeneration]


class GenerationResult(RequestModel):
    status: Literal["succeeded", "failed"]
    image_key: str | None = Field(default=None, min_length=1, max_length=MAX_IMAGE_KEY_LENGTH)
    error: str | None = Field(default=None, max_length=MAX_ERROR_LENGTH)

    @model_validator(mode="after")
    def _succeeded_needs_an_image(self) -> Self:
        if self.status == "succeeded" and self.image_key is None:
            raise ValueError("a succeeded result needs an image_key")
        return self


CLAIM_REPEATED = (
    "A repeat answers those of the key's generations still processing and takes no more while any"
    " is; a key whose generations all finished claims anew. Use a new key for each claim"
)


@endpoint(auth="callback", request=Claim, response=ClaimedPage, idempotent=CLAIM_REPEATED)
async def claim(request: Request) -> Response:
    """Claim up to `limit` pending generations for `lease_seconds`, oldest first.

    Repeated with the same `Idempotency-Key` (after its answer was lost), it
    answers the generations that claim took which are still processing, and
    takes no more while any is. A key whose generations have all finished (or
    gone back to the queue) claims anew: use a new key for each claim, unique
    across workers. A repeat sent while the first is still running waits for
    it and answers the same batch (the claim holds a lock on its key).
    403 for a wrong or missing X-Callback-Secret, and for every caller while
    GENERATION_CALLBACK_SECRET is unset.
    """
    check_callback_secret(request)
    no_query_params(request)
    body = await read_json(request, Claim)
    key = idempotency_key(request)
    claim_id = uuid.uuid5(CLAIM_KEYS, key) if key is not None else uuid.uuid4()
    claimed = await generations.claim_generations(body.limit, body.lease_seconds, claim_id=claim_id)
    items = [ClaimedGeneration.model_validate(item, from_attributes=True) for item in claimed]
    return json_response(ClaimedPage(items=items))


@endpoint(auth="callback", request=GenerationResult, response=Generation)
async def record_result(request: Request) -> Response:
    """Report a generation `succeeded` (with its image_key) or `failed` (refunded once).

    A finished generation is answered unchanged; an unknown or malformed id is 404.
    403 for a wrong or missing X-Callback-Secret, and for every caller while
    GENERATION_CALLBACK_SECRET is unset.
    """
    check_callback_secret(request)
    no_query_params(request)
    body = await read_json(request, GenerationResult)
    generation = await generations.record_result(
        request.path_params["id"], body.status, body.image_key, body.error
    )
    return json_response(generation_view(generation))


routes = [
    Route("/api/worker/claim", claim, methods=["POST"]),
    Route("/api/generations/{id:uuid}/result", record_result, methods=["POST"]),
]
app = build_app(routes)
handler = LambdaEntry(app)
