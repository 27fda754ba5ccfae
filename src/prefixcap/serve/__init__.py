"""The HTTP captioning service: `app` (FastAPI routes), `batching` (dynamic batching on one model thread),
`guards` (host, body size, bytes in flight, deadlines), `http` (uvicorn with bounded connections),
`memory` (returning freed memory to the OS), `config` (ServeConfig) and `cli` (`prefixcap serve`).

Only `config` and `cli` import without the serve extra, so `prefixcap serve --help` always works.
"""
