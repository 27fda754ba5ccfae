"""`prefixcap serve`: flags -> ServeConfig, port check, model load, then the server.

Imports nothing of the serve extra (FastAPI, uvicorn) before it is needed, so `--help` works
without it and a missing extra is one line naming the install command.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import sys
import warnings
from dataclasses import MISSING, fields

from prefixcap.argtypes import ArgumentParser
from prefixcap.model.quantize import list_quantize_modes
from prefixcap.serve.batching import BatchConfig
from prefixcap.serve.config import ServeConfig

logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install -e '.[serve]' in a checkout, pip install 'prefixcap[serve]' otherwise"


def _defaults(cls: type) -> dict:
    """A dataclass's field defaults, without constructing it."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def build_parser() -> argparse.ArgumentParser:
    d, b = _defaults(ServeConfig), _defaults(BatchConfig)
    p = ArgumentParser(prog="prefixcap serve", description="HTTP captioning service with a web page.")
    p.add_argument("--model", required=True, help="trained prefixcap model: a folder or a Hub repo id")
    p.add_argument("--datastore", default=None, help="a retrieval model's caption datastore, searched per batch "
                   "(default: the one it was trained with; docs/retrieval.md)")
    p.add_argument("--host", default=d["host"], help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=d["port"])
    p.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--quantize", default=None, choices=list_quantize_modes(),
                   help="int8: the LM's linear layers in int8 (CPU only; faster decoding, captions may differ "
                        "slightly from fp32; docs/caption.md)")
    g = p.add_argument_group("batching")
    g.add_argument("--max_batch_size", type=int, default=b["max_batch_size"], help="images per model call")
    g.add_argument("--max_wait_ms", type=float, default=b["max_wait_ms"],
                   help="how long a queued image may wait for others to share its batch")
    g.add_argument("--max_queue", type=int, default=b["max_queue"],
                   help="images waiting for the model; beyond it requests get 503 + Retry-After")
    g.add_argument("--request_timeout_s", type=float, default=b["request_timeout_s"])
    g = p.add_argument_group("limits")
    g.add_argument("--max_upload_mb", type=float, default=d["max_upload_bytes"] / 2**20, help="request body size")
    g.add_argument("--max_image_pixels", type=int, default=d["max_image_pixels"],
                   help="larger images are refused (decompression bombs)")
    g.add_argument("--max_images_per_request", type=int, default=d["max_images_per_request"])
    g.add_argument("--max_num_beams", type=int, default=d["max_num_beams"])
    g.add_argument("--max_new_tokens_limit", type=int, default=d["max_new_tokens_limit"],
                   help="largest max_new_tokens a client may ask for")
    g.add_argument("--default_max_new_tokens", type=int, default=None,
                   help="when the client sets none (default: the model's trained caption length, capped)")
    g.add_argument("--max_return_sequences", type=int, default=d["max_return_sequences"])
    g.add_argument("--max_temperature", type=float, default=d["max_temperature"],
                   help="largest sampling temperature a client may ask for")
    g.add_argument("--decode_threads", type=int, default=d["decode_threads"], help="images decoded at once")
    g.add_argument("--allow_urls", action="store_true",
                   help="let JSON requests name image URLs the server fetches (off: a public server "
                        "would fetch whatever it is told, including internal addresses)")
    _add_connection_args(p, d)
    p.add_argument("--log_level", default=d["log_level"], choices=["critical", "error", "warning", "info", "debug"])
    return p


def _add_connection_args(p: argparse.ArgumentParser, d: dict) -> None:
    g = p.add_argument_group("connections (slow or hostile clients)")
    g.add_argument("--max_inflight_mb", type=float, default=d["max_inflight_bytes"] / 2**20,
                   help="request bodies being handled at once, in total; beyond it requests wait "
                        "briefly, then get 503 + Retry-After")
    g.add_argument("--max_connections", type=int, default=d["max_connections"],
                   help="requests in progress at once; beyond it: JSON 503 + Retry-After (idle kept-alive "
                        "connections do not count; past this many, the oldest idle one is closed)")
    g.add_argument("--keep_alive_s", type=float, default=d["keep_alive_s"],
                   help="idle time before a kept-alive connection is closed")
    g.add_argument("--header_timeout_s", type=float, default=d["header_timeout_s"],
                   help="a request's headers must be complete this long after its first byte")
    g.add_argument("--body_timeout_s", type=float, default=d["body_timeout_s"],
                   help="a request's body must be complete this long after its headers (else 408)")
    g.add_argument("--graceful_shutdown_s", type=float, default=d["graceful_shutdown_s"],
                   help="after SIGTERM/Ctrl-C, how long requests in progress may take before they are cut")
    g.add_argument("--allowed_hosts", default=None,
                   help="comma-separated Host header names to serve ('*.example.org' for subdomains, '*' for "
                        "any); default: the --host address and localhost")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    batch = BatchConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                        max_queue=args.max_queue, request_timeout_s=args.request_timeout_s)
    hosts = None
    if args.allowed_hosts is not None:
        hosts = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
        if not hosts:
            raise ValueError("--allowed_hosts names no host (give e.g. 'captions.example.org,localhost' or '*')")
    return ServeConfig(
        model=args.model, datastore=args.datastore, host=args.host, port=args.port, device=args.device,
        quantize=args.quantize, batch=batch,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_image_pixels=args.max_image_pixels,
        max_images_per_request=args.max_images_per_request, max_num_beams=args.max_num_beams,
        max_new_tokens_limit=args.max_new_tokens_limit, default_max_new_tokens=args.default_max_new_tokens,
        max_return_sequences=args.max_return_sequences, max_temperature=args.max_temperature,
        decode_threads=args.decode_threads,
        allow_urls=args.allow_urls, log_level=args.log_level,
        max_inflight_bytes=int(args.max_inflight_mb * 2**20), max_connections=args.max_connections,
        keep_alive_s=args.keep_alive_s, header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
        graceful_shutdown_s=args.graceful_shutdown_s, allowed_hosts=hosts,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def _missing_extra() -> str | None:
    """The first module of the serve extra that cannot be imported, or None."""
    for module in ("fastapi", "uvicorn", "python_multipart"):
        try:
            __import__(module)
        except ImportError:
            return module
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"prefixcap serve: {err}", file=sys.stderr)
        return 2
    missing = _missing_extra()
    if missing is not None:
        print(f"prefixcap serve: the serve extra is not installed (no module {missing!r}); {EXTRA_HINT}",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import prefixcap.serve.http as serve_http

    try:  # before the model loads (which can take minutes): a port in use is known at once
        sock = serve_http.bind_socket(config.host, config.port)
    except OSError as err:
        print(f"prefixcap serve: cannot listen on {config.host}:{config.port}: {err.strerror or err} "
              "(another server there? choose --port)", file=sys.stderr)
        return 1
    with sock:
        return _load_and_serve(config, sock)


def _load_and_serve(config: ServeConfig, sock) -> int:
    from PIL import Image

    from prefixcap.caption.captioner import Captioner as PrefixCaptioner
    from prefixcap.retrieval.datastore import DatastoreError
    from prefixcap.serve.app import create_app
    from prefixcap.serve.http import run_server
    from prefixcap.serve.memory import tune_malloc

    try:
        captioner = PrefixCaptioner.from_pretrained(config.model, device=config.device, datastore=config.datastore,
                                                    quantize=config.quantize)
    except DatastoreError as err:  # a --datastore that is missing, empty or of another CLIP width
        print(f"prefixcap serve: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"prefixcap serve: cannot load model {config.model!r}: {err}", file=sys.stderr)
        return 1
    # PIL's own decompression-bomb check agrees with ours (it raises above twice this value).
    # Its warning between 1x and 2x is redundant: the decoder refuses those images itself.
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    tune_malloc()
    if not _is_loopback(config.host):
        logger.warning("listening on %s: the service has no authentication; put it behind a proxy that has",
                       config.host)
    port = sock.getsockname()[1]  # the real one when --port 0 asked for any free port
    print(f"prefixcap serve: http://{config.host}:{port}/ (API docs at /docs)", flush=True)
    run_server(create_app(captioner, config), config, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
