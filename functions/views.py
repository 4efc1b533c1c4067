"""Response bodies that more than one function module answers with.

A generation is returned to its owner (functions/generations.py) and to the
worker that reports its result (functions/worker.py). It lives here, not in
either module, so the worker does not import the user-facing function (and
its identity layer, PyJWT and cryptography) at cold start.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from database.model import Model
from repositories import generations


class Generation(Model):
    id: UUID
    status: Literal["pending", "processing", "succeeded", "failed"]
    prompt: str
    quality: str
    cost: int
    attempt: int
    image_key: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


def generation_view(generation: generations.Generation) -> Generation:
    return Generation.model_validate(generation, from_attributes=True)
