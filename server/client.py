"""A small httpx client for halfstep (sync and async), used by the tests and the benchmark,
and `wait_ready`, which waits for a server to warm up."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


class HalfstepError(Exception):
    """A non-2xx answer: `status`, the JSON `body` (or text) and the headers."""

    def __init__(self, status: int, body, headers: httpx.Headers) -> None:
        message = body.get("error", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.body, self.headers = status, body, headers


@dataclass
class Generated:
    content: bytes  # the PNG (format=png) or the JSON text (format=json)
    headers: httpx.Headers
    steps: int
    seed: int
    model: str
    json: dict | None = None

    @property
    def pngs(self) -> list[bytes]:
        """Each image's PNG (format=json), or the one PNG/grid (format=png)."""
        if self.json is None:
            return [self.content]
        return [base64.b64decode(image["png"]) for image in self.json["images"]]


def _params(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def _result(response: httpx.Response) -> Generated:
    _raise_for(response)
    h = response.headers
    as_json = response.json() if h.get("content-type", "").startswith("application/json") else None
    return Generated(response.content, h, int(h["x-halfstep-steps"]), int(h["x-halfstep-seed"]),
                     h["x-halfstep-model"], as_json)


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = response.text
    raise HalfstepError(response.status_code, body, response.headers)


def _auth(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Blocking client: `Client(url).generate(steps=4, n=2, seed=0)`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=base_url, headers=_auth(api_key), timeout=timeout,
                                 transport=transport)

    def generate(self, steps: int | None = None, model: str | None = None, n: int | None = None,
                 seed: int | None = None, label: int | None = None,
                 format: str | None = None, bundle: str | None = None) -> Generated:
        params = _params(steps=steps, model=model, n=n, seed=seed, label=label, format=format,
                         bundle=bundle)
        return _result(self.http.post("/generate", params=params))

    def reload(self) -> dict:
        """POST /admin/reload (needs the server's API key): each bundle's outcome."""
        response = self.http.post("/admin/reload")
        _raise_for(response)
        return response.json()["bundles"]

    def models(self) -> dict:
        response = self.http.get("/v1/models")
        _raise_for(response)
        return response.json()

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """See `wait_ready`."""
        wait_ready(self, timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """Asyncio client with the same methods (awaitable)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 limits: httpx.Limits | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, headers=_auth(api_key), timeout=timeout,
                                      transport=transport, limits=limits or httpx.Limits())

    async def generate(self, steps: int | None = None, model: str | None = None,
                       n: int | None = None, seed: int | None = None, label: int | None = None,
                       format: str | None = None, bundle: str | None = None) -> Generated:
        params = _params(steps=steps, model=model, n=n, seed=seed, label=label, format=format,
                         bundle=bundle)
        return _result(await self.http.post("/generate", params=params))

    async def reload(self) -> dict:
        """POST /admin/reload (needs the server's API key): each bundle's outcome."""
        response = await self.http.post("/admin/reload")
        _raise_for(response)
        return response.json()["bundles"]

    async def models(self) -> dict:
        response = await self.http.get("/v1/models")
        _raise_for(response)
        return response.json()

    async def metrics(self) -> str:
        return (await self.http.get("/metrics")).text

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def wait_ready(server: str | Client, timeout_s: float = 60.0,
               is_alive: Callable[[], bool] | None = None) -> None:
    """Poll GET /readyz of `server` (a base URL or a Client) until it answers 200.

    RuntimeError when the server reports that its warm-up failed, or when `is_alive` (say, a
    check on the server's process) returns False; TimeoutError after timeout_s.
    """
    client = Client(server, timeout=5.0) if isinstance(server, str) else server
    url = client.http.base_url
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if is_alive is not None and not is_alive():
                raise RuntimeError(f"server at {url} stopped before it was ready")
            try:
                r = client.http.get("/readyz")
            except httpx.TransportError:
                r = None  # not listening yet
            if r is not None and r.status_code == 200:
                return
            if r is not None and "failed" in r.json().get("reason", ""):
                raise RuntimeError(f"server at {url}: {r.json()['reason']}")
            time.sleep(0.05)
        raise TimeoutError(f"server at {url} not ready after {timeout_s} s")
    finally:
        if client is not server:
            client.close()
