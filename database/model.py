"""The base of every pydantic model in the project.

Models are built (their validator and serializer compiled from the class) on
first use, not at import: a Lambda imports every model of its function module
but one request uses a few, and building the rest cost each cold start
about 10 % of its import time (bench/cold_start.py).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    model_config = ConfigDict(defer_build=True)
