"""The same hello world on Starlette + Mangum, the stack functions/ is built
on: the floor a DreamLens function starts from before its own imports and the
database connect."""

from mangum import Mangum
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def hello(_: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


app = Starlette(routes=[Route("/api/hello", hello)])
handler = Mangum(app, lifespan="off")
