"""The HTTP API (aiohttp): enqueue messages, manage devices, campaigns, dead letters; documented in ../openapi.yaml.

Every route under /v1 needs `Authorization: Bearer <token>`; the token is compared in constant
time with every configured client's token (no early exit, so timing reveals nothing about which
or how many matched), and the client's scopes decide what it may do. Each client has its own
rate (messages per second, a batch of 100 costs 100), one limit shared by every API process, so one
noisy upstream cannot starve the others. Bodies are bounded in size and in time before they are read;
slow and malformed requests are refused by the server (server.py). Every failure is a JSON error with
a stable `code`; a malformed body is a 4xx, a Redis outage a 503 with Retry-After, never a 500
with a trace. Tokens and message contents are never logged.

Modules, each importing only those above it in this list:
  context         the keys under which the app and each request carry their state
  errors          ApiError, the JSON error shape and the JSON body helpers (with the body's read timeout)
  auth            tokens, scopes and the per-client rate limit
  routes          messages, devices, preferences, dead letters, invalid-token events
  campaign_routes learner attributes, templates, campaigns, launches, events, reports
  probes          health, readiness, metrics and the OpenAPI document (no token)
  server          the HTTP/1.1 server: malformed requests, read timeouts, connection cap (start_api)
  app             create_app (middlewares and routes together) and serve_api (the process)
"""

from .app import create_app, serve_api

__all__ = ["create_app", "serve_api"]
