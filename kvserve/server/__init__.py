"""The OpenAI-compatible HTTP server: ``build_app`` wraps an AsyncEngine in a FastAPI app.

    protocol.py      request and response models (OpenAI's field names and limits)
    errors.py        OpenAI's error JSON and the exception handlers
    streams.py       the engine requests of one HTTP request (``n`` choices, several prompts)
    serving.py       what the endpoints share: limits, sampling params, usage, delivery
    sse.py           server-sent events
    chat.py          POST /v1/chat/completions
    completions.py   POST /v1/completions
    app.py           the app: routes, API key, lifespan, draining on shutdown
    metrics.py       Prometheus metrics for GET /metrics
    request_log.py   one log line per finished request
"""
