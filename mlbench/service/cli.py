"""``mlbench serve``: run the reference service in the foreground under uvicorn."""

from __future__ import annotations

import argparse

from mlbench.pipeline.options import PRESET_NAMES

__all__ = ["add_serve_command"]


def add_serve_command(sub) -> None:
    """Add the ``serve`` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("serve", help="run the reference segmentation service (FastAPI under uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--preset", default="fixed", choices=PRESET_NAMES,
                   help="as_served reproduces the historic service (allow-list, blocking route, no limits)")
    p.add_argument("--executor", default="process", choices=["process", "thread"],
                   help="run inference in worker processes (default: each loads the models once, a run that does "
                        "not stop after its timeout is killed) or in threads of the server process")
    p.add_argument("--workers", type=int, default=1, help="inference workers (processes or threads)")
    p.add_argument("--queue-size", type=int, default=8)
    p.add_argument("--max-wait", type=float, default=10.0, help="seconds a request may wait for a worker (503)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request inference timeout in seconds (504)")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a request body may go without a byte, and the allowance of --min-upload-rate (408)")
    p.add_argument("--min-upload-rate", type=float, default=50_000.0,
                   help="bytes/s a request body must average after --body-timeout (408 when slower)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a whole request head, from its opening and after each "
                        "response (then closed; 408 when part of a head came)")
    p.add_argument("--max-uploads", type=int, default=32, help="request bodies received at once (503 beyond)")
    p.add_argument("--worker-memory-gib", type=float, default=4.0,
                   help="GiB of address space each worker process may add after loading its models (process "
                        "executor; a request past it answers 500 out_of_memory, the worker goes on); 0: no limit")
    p.add_argument("--input-size", type=int, default=None, help="model input side (default: the model's own)")
    p.add_argument("--weights-dir", default=None,
                   help="serve the service's own checkpoints: a folder with hrnet_best_model.pth, "
                        "resunet_small_best_model.pth, resunet_advanced_best_model.pth (input 1024 px unless "
                        "--input-size); default: the bundled small models")
    p.add_argument("--metrics-export-dir", default=None,
                   help="folder POST /api/v1/monitoring/gpu/export-metrics writes into (default: export off)")
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mlbench.service.app import create_app
    from mlbench.service.connections import http_protocol
    from mlbench.service.logs import configure_logging
    from mlbench.service.runner import DrainingServer
    from mlbench.service.settings import ServiceSettings, weights_files

    options = {"input_size": args.input_size} if args.input_size else {}
    common = dict(freeze_gc=True, executor=args.executor, workers=args.workers, queue_size=args.queue_size,
                  max_wait_s=args.max_wait, timeout_s=args.timeout, options=options, body_timeout_s=args.body_timeout,
                  min_upload_rate=args.min_upload_rate, header_timeout_s=args.header_timeout,
                  worker_memory_bytes=int(args.worker_memory_gib * 1024 ** 3) or None,
                  max_uploads=args.max_uploads,
                  metrics_export_dir=args.metrics_export_dir, weights_dir=args.weights_dir)
    settings = ServiceSettings.as_served(**common) if args.preset == "as_served" else ServiceSettings(**common)
    if settings.weights_dir is not None:
        weights_files(settings.weights_dir)  # a wrong folder stops here, before the server starts
    configure_logging()
    app = create_app(settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, lifespan="on",
                            http=http_protocol(app), timeout_graceful_shutdown=settings.drain_timeout_s)
    DrainingServer(config).run()
    return 0
