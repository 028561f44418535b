"""POST /admin/reload: reload the served bundles (`reload.py`), for operators.

Off unless HALFSTEP_API_KEY is set (403 saying so): reloading reads the server's disk and costs
a warm-up, so it is never open to anonymous callers; the bearer-token middleware guards /admin.
200 when every bundle was swapped or unchanged; 409 when one was refused (the body says why,
the old weights keep serving); 503 while draining.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .outcomes import Draining
from .reload import reload_all

router = APIRouter(prefix="/admin", tags=["Administration"])


@router.post("/reload", summary="Re-read the bundle directories and swap in changed weights",
             response_model=None)
async def reload(request: Request) -> JSONResponse:
    state = request.app.state.halfstep
    if not state.settings.api_key:
        return JSONResponse({"error": "reloading is turned off: set HALFSTEP_API_KEY on the "
                                      "server to enable /admin/reload (or send the process "
                                      "SIGHUP)"}, 403)
    try:
        outcomes = await reload_all(state)
    except Draining as exc:
        return JSONResponse({"error": str(exc)}, 503, {"Retry-After": "1"})
    refused = [name for name, o in outcomes.items() if o.result == "refused"]
    body = {"bundles": {name: o.as_dict() for name, o in outcomes.items()}}
    if refused:
        body["error"] = f"reload refused for {', '.join(refused)}; see bundles.<name>.reason"
    return JSONResponse(body, 409 if refused else 200)
