"""The caller's generations: create (spend and queue), list, read, download.

POST /api/generations is one database statement for a warm caller: the spend,
the generation, its ledger row and the usage row commit together
(repositories.generations.create_generation). Without an `Idempotency-Key`
header the request gets a fresh key here, so sql() retrying the statement
after a dropped connection still applies it once. A repeat with the same key
answers 201 with the first response's body (status `pending`, the balance
right after that spend), however far the generation has moved since.
The query, headers and body are checked before the caller is resolved, so
bad input writes nothing, not even a first-seen device (a bad request
without an identity hears about its input before the 401).

Generation ids in paths are UUIDs; anything else matches no route and is a
404, as is another user's generation.

Downloads sign an S3 GET URL for the image locally (no AWS call on the
request path); boto3 is imported and its client built on the first download
of the process only.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from database import ConfigurationError, Conflict, InsufficientTokens, NotFound, RateLimited
from database.model import Model
from functions import metrics, settings
from functions.app import build_app
from functions.http import (
    RequestModel,
    idempotency_key,
    json_response,
    no_query_params,
    page_params,
    read_json,
)
from functions.identity import current_user, known_user, source_ip
from functions.lambda_entry import LambdaEntry
from functions.openapi import endpoint
from functions.views import Generation, generation_view
from repositories import generations, usage

MAX_PROMPT_LENGTH = 2000  # the CHECK on generations.prompt
DOWNLOAD_URL_SECONDS = 900


class CreateGeneration(RequestModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_LENGTH)
    quality: Literal["standard", "hd"] = "standard"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        # stored as sent (spaces included); only a prompt of nothing is refused
        if not prompt.strip():
            raise ValueError("must not be blank")
        return prompt


class NewGeneration(Model):
    id: UUID
    status: Literal["pending"]
    cost: int
    balance: int  # right after this generation's spend
    prompt: str
    quality: str
    created_at: datetime


class GenerationPage(Model):
    items: list[Generation]
    next_before: UUID | None


class Download(Model):
    url: str
    expires_in: int  # seconds the URL stays valid


@endpoint(
    auth="user",
    request=CreateGeneration,
    response=NewGeneration,
    status=201,
    errors=[402, 409, 429],
    idempotent=True,
)
async def create_generation(request: Request) -> Response:
    """Spend the price of the quality and queue a generation.

    402 with `balance` and `cost` when the balance is too low; 429 with
    Retry-After when the plan's daily limit is reached (it lifts at 00:00
    UTC); 409 when the Idempotency-Key was used with another prompt or quality.
    """
    no_query_params(request)
    key = idempotency_key(request) or str(uuid.uuid4())
    body = await read_json(request, CreateGeneration)
    user = await current_user(request)
    try:
        created = await generations.create_generation(user.id, body.prompt, body.quality, key)
    except InsufficientTokens:
        metrics.emit({"InsufficientTokensRejections": 1})
        raise
    except RateLimited:
        metrics.emit({"RateLimitRejections": 1})
        raise
    generation = created.generation
    if not created.replayed:
        metrics.emit({"TokensSpent": generation.cost})
    first_response = NewGeneration(
        id=generation.id,
        # what the first response said, whatever the worker has done since
        status="pending",
        cost=generation.cost,
        balance=created.balance,
        prompt=generation.prompt,
        quality=generation.quality,
        created_at=generation.created_at,
    )
    return json_response(first_response, status=201)


@endpoint(auth="user", response=GenerationPage, paged=UUID)
async def list_generations(request: Request) -> Response:
    """The caller's generations, newest first.

    Pass `next_before` back as `before` for the next page; it is null on the last.
    """
    limit, before = page_params(request, cursor=UUID)
    user = await current_user(request)
    page = await generations.list_generations(user.id, limit=limit, before=before)
    items = [generation_view(generation) for generation in page.items]
    return json_response(GenerationPage(items=items, next_before=page.next_before))


@endpoint(auth="user", response=Generation, errors=[422])
async def get_generation(request: Request) -> Response:
    """One of the caller's generations; another user's, or a malformed id, is 404."""
    no_query_params(request)
    generation = await callers_generation(request)
    return json_response(generation_view(generation))


async def callers_generation(request: Request) -> generations.Generation:
    """The generation of the path, the caller's or NotFound. A caller never
    seen has none, and is not created (nor given a welcome bonus) for a 404."""
    user = await known_user(request)
    if user is None:
        raise NotFound("Generation not found")
    return await generations.get_generation(user.id, request.path_params["id"])


# ------------------------------------------------------------------ download

_s3_lock = threading.Lock()
_s3_client: Any = None


def s3_client() -> Any:
    """The process's S3 client, built on first use (boto3 is a cold-start cost
    only the download path pays). Its own session: boto3's default session is
    not safe to build clients from on two threads."""
    global _s3_client
    with _s3_lock:
        if _s3_client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            _s3_client = session.client("s3", config=Config(signature_version="s3v4"))
        return _s3_client


def forget_s3_client() -> None:
    """Build the client afresh on the next download (tests change credentials)."""
    global _s3_client
    with _s3_lock:
        _s3_client = None


def presigned_get_url(bucket: str, key: str, expires_in: int) -> str:
    url: str = s3_client().generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_in
    )
    return url


@endpoint(
    auth="user",
    response=Download,
    errors=[409, 422],
    idempotent="A repeat for the same generation answers a fresh URL and logs no second download",
)
async def download_generation(request: Request) -> Response:
    """A presigned S3 URL for the image of one of the caller's succeeded generations.

    409 while the generation is not succeeded; another user's is 404. Logs a
    download: once for each `Idempotency-Key` (a repeat gets a fresh URL).
    """
    no_query_params(request)
    # our own key when the client sends none: sql() retrying the log after a
    # lost commit must not count the download twice
    key = idempotency_key(request) or f"auto:{uuid.uuid4()}"
    generation = await callers_generation(request)
    if generation.status != "succeeded" or generation.image_key is None:
        raise Conflict(f"The generation is {generation.status}: only a succeeded image can be downloaded")
    bucket = settings.images_bucket()
    if bucket is None:
        raise ConfigurationError("IMAGES_BUCKET is not set: images cannot be downloaded")
    # signing is local, but the first call builds the client and may fetch
    # credentials: off the event loop
    url = await asyncio.to_thread(presigned_get_url, bucket, generation.image_key, DOWNLOAD_URL_SECONDS)
    reference = str(generation.id)
    await usage.log_usage(generation.user_id, "download", source_ip(request), reference=reference, key=key)
    return json_response(Download(url=url, expires_in=DOWNLOAD_URL_SECONDS))


routes = [
    Route("/api/generations", create_generation, methods=["POST"]),
    Route("/api/generations", list_generations, methods=["GET"]),
    Route("/api/generations/{id:uuid}", get_generation, methods=["GET"]),
    Route("/api/generations/{id:uuid}/download", download_generation, methods=["POST"]),
]
app = build_app(routes)
handler = LambdaEntry(app)
