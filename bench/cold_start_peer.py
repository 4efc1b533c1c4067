"""The cold-start peer: a FastAPI + Mangum hello world, the way most teams
would start a Python Lambda. bench/cold_start.py times a fresh process that
imports this module and answers one API Gateway event with it."""

from fastapi import FastAPI
from mangum import Mangum

app = FastAPI()


@app.get("/api/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


handler = Mangum(app, lifespan="off")
