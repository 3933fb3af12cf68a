"""`rali-edge serve`: quality scores over HTTP, for other programs."""

from __future__ import annotations


import signal

import click

from rali_edge.cli.common import model_options


@click.command(
    "serve",
    epilog="""\b
Examples:
  rali-edge serve                                   # the built-in model on 127.0.0.1:8000
  rali-edge serve --model rali-vitl14-336 --device cuda --host 0.0.0.0 --api-key "$KEY"
  curl -F file=@a.jpg -F file=@b.jpg http://127.0.0.1:8000/score
  curl --data-binary @a.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/score
""",
)
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Most images per encoder call, from all requests together.")
@click.option("--max-delay-ms", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a batch's first image waits for others.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1),
              help="Most images in flight; past it, 503 with Retry-After.")
@click.option("--max-bytes", default=32 << 20, show_default=True, type=click.IntRange(min=1),
              help="Largest request body; over it, 413.")
@click.option("--max-images", default=64, show_default=True, type=click.IntRange(min=1), help="Most images per request.")
@click.option("--read-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client may take between two chunks of its body; then 408.")
@click.option("--allow-urls", multiple=True, metavar="SCHEME",
              help="Fetch URLs of this scheme that clients send as {\"urls\": [...]} (repeatable; default: none).")
@click.option("--api-key", envvar="RALI_EDGE_API_KEY", show_envvar=True,
              help="Require Authorization: Bearer KEY on every route but the health checks.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Serve on a Ray cluster with Ray Serve (auto, local, HOST:PORT): the same app in --replicas "
                   "replicas, each loading the model once.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="With --ray: replicas.")
@click.option("--ray-gpus", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="With --ray: GPUs per replica (then --device defaults to cuda).")
def serve_command(host, port, max_batch, max_delay_ms, max_queue, max_bytes, max_images, read_timeout, allow_urls,
                  api_key, ray_address, replicas, ray_gpus, **model_kwargs):
    """Serve quality scores over HTTP: POST /score (multipart files or one image as the body),
    the KServe v2 / Triton HTTP protocol at /v2/models/rali/infer, /healthz, /readyz, /metrics
    (Prometheus) and the OpenAPI description at /openapi.json (/docs to try it).

    Requests share encoder calls (--max-batch, --max-delay-ms). The model is loaded (and its
    engine built, on first use) before the port opens. SIGTERM or Ctrl-C: no new connection,
    the requests in flight are answered, exit 0. Exit codes as every command's: 2 usage, 3 the
    model cannot be loaded, 4 a missing library (pip install 'rali-edge[serve]').
    """
    from rali_edge.cli.common import load_scorer
    from rali_edge.serving import ServeOptions, check_port, require_serving, run, run_on_ray

    require_serving()
    check_port(host, port)  # a busy port: exit 2 now, not after minutes of loading
    options = ServeOptions(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue, max_bytes=max_bytes,
                           max_images=max_images, read_timeout_s=read_timeout,
                           allow_urls=tuple(s.lower().rstrip(":/") for s in allow_urls), api_key=api_key or None)
    if host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        click.echo(f"note: serving on {host} without --api-key: anyone who reaches it can use it", err=True)
    if ray_address:
        if model_kwargs.get("engine"):
            raise click.UsageError("--ray builds or reuses engines on each node (backend auto): leave out --engine")
        device = model_kwargs["device"] if model_kwargs["device"] != "cpu" or not ray_gpus else "cuda"
        load_options = dict(model=model_kwargs["model"], device=device, dtype=model_kwargs["dtype"],
                            backend=model_kwargs["backend"], head=model_kwargs["head"], cache=not model_kwargs["no_cache"])
        run_on_ray(load_options, options, ray_address, replicas, ray_gpus, host, port,
                   log=lambda line: click.echo(line, err=True))
        return
    scorer = load_scorer(**model_kwargs, quiet=False)
    # uvicorn takes SIGTERM and SIGINT while it serves, finishes the requests in flight, then raises
    # the signal again: SIGTERM (a service manager stopping it) is then ignored and serve exits 0;
    # Ctrl-C stays an interruption (exit 130), as in every command.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run(scorer, options, host, port, log=lambda line: click.echo(line, err=True))


__all__ = ["serve_command"]
