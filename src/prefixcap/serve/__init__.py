"""The HTTP captioning service (`prefixcap serve`).

Its modules: `app` (the FastAPI app: service, routes), `requests` (reading a request's body, images and
options), `schemas` (pydantic request/response models), `batching` (dynamic batching on one model
thread), `guards` (host, body size, bytes in flight, deadlines), `http` (uvicorn with bounded
connections), `memory` (returning freed memory to the OS), `config` (ServeConfig) and `cli`.

Only `config` and `cli` import without the serve extra, so `prefixcap serve --help` always works.
"""

from prefixcap import lazy_exports

# The library entry: `create_app(captioner, ServeConfig)` builds the ASGI app; `run_server` serves it.
_LAZY = {"ServeConfig": "prefixcap.serve.config", "create_app": "prefixcap.serve.app",
         "run_server": "prefixcap.serve.http"}
__getattr__ = lazy_exports(__name__, _LAZY)
__all__ = sorted(_LAZY)
