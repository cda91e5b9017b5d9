"""Routes once: one table registers every route, and /openapi.json is derived from it."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from evomsgd.models import Accepted, SendRequest
from evomsgd.web import openapi, routes
from evomsgd.web.routes import Answer, Operation, Route

# Pages, files and Prometheus text: served, registered, and outside the API document.
NOT_API = {
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/init.js"),
    ("GET", "/metrics"),
    ("GET", "/dashboard"),
    ("GET", "/stats/hourly"),
}


async def operations(client: TestClient[Any, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    doc = await (await client.get("/openapi.json")).json()
    return {(m.upper(), p): op for p, ops in doc["paths"].items() for m, op in ops.items()}


async def test_every_served_route_is_a_row_and_every_api_row_is_documented(
    client: TestClient[Any, Any],
) -> None:
    served = [
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"  # aiohttp adds one to each GET
        and not isinstance(route.resource, web.StaticResource)  # file trees, not routes
    ]
    rows = routes.table(client.app)
    assert sorted(served) == sorted((row.method, row.path) for row in rows)
    documented = {key: op["operationId"] for key, op in (await operations(client)).items()}
    assert documented == {
        (row.method, row.path): row.operation.id for row in rows if row.operation is not None
    }
    assert {(row.method, row.path) for row in rows if row.operation is None} == NOT_API
    # web/callbacks.py's six routes (issue 15), the media download (issue 16)
    assert len(documented) == 14 + 6 + 1


async def test_the_guards_answers_follow_the_guards_rules(client: TestClient[Any, Any]) -> None:
    ops = await operations(client)
    for (method, path), op in ops.items():
        answers = set(op["responses"])
        assert "403" in answers, (method, path)
        # A form can POST; DELETE needs a preflight, so it needs no Content-Type (issue 12.10).
        assert ("415" in answers) == (method == "POST"), (method, path)
        public = op["security"] == []
        assert public == (path == "/"), (method, path)
        assert ("401" in answers) != public, (method, path)
    assert set(ops[("DELETE", "/tasks/{task_id}")]["responses"]) == {
        "200",
        "404",
        "409",
        "403",
        "401",
        "503",
    }
    assert ops[("GET", "/tasks/{task_id}")]["parameters"] == [
        {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]


async def test_a_registered_row_is_served_and_documented(aiohttp_client: Any) -> None:
    async def make(request: web.Request) -> web.Response:
        return web.json_response({"thing": request.match_info["thing"]}, status=201)

    app = web.Application()
    made = Answer(201, "Made", Accepted)
    routes.register(
        app,
        [
            Route(
                "POST",
                "/things/{thing}",
                make,
                Operation(
                    "makeThing", "Make a thing", (made, routes.UNKNOWN_TASK), body=SendRequest
                ),
            )
        ],
    )
    client = await aiohttp_client(app)
    served = await client.post("/things/t1")
    assert served.status == 201 and await served.json() == {"thing": "t1"}
    op = openapi.document(routes.table(app))["paths"]["/things/{thing}"]["post"]
    assert op["operationId"] == "makeThing" and op["summary"] == "Make a thing"
    assert list(op["responses"]) == ["201", "404", "403", "401", "503", "415"]
    assert op["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Accepted"
    }
    assert op["parameters"] == [
        {"name": "thing", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    assert op["requestBody"] == {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SendRequest"}}},
    }
    assert op["security"] == [{"bearer": []}, {}]
    schemas = openapi.document(routes.table(app))["components"]["schemas"]
    assert {"Accepted", "SendRequest", "ErrorBody"} <= set(schemas)
