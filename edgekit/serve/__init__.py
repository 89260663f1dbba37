"""``edgekit serve``: a verified release bundle (or a model folder) as an HTTP service.

``config``: the options (``ServeConfig``, one declaration for the CLI and the Python API); ``model``: the bundle
re-hashed, loaded through the one runtime interface, and the task's pre- and post-processing; ``batching``: the
bounded queue that forms dynamic batches; ``metrics``: the Prometheus metrics; ``app``: the FastAPI application
(endpoints, access control, limits); ``server``: uvicorn, workers, TLS and graceful shutdown. FastAPI, uvicorn
and prometheus_client are the ``serve`` extra, imported only by this package.
"""
