"""Disaggregated prefill and decode: a prefill engine computes a request's KV cache and hands it,
layer by layer as each layer finishes, to a decode engine that continues the request.

- ``transfer``: what travels (a plan per request, and chunks of one layer's K/V for a token range).
- ``transport``: how it travels (in-process queue; more to come).
- ``connector``: the engine-side halves: the prefill worker's saver, called after every layer,
  and the decode side's loader, which reserves blocks (skipping those its prefix cache already
  holds), writes arriving chunks into them and hands the request to its scheduler.
- ``pair``: a prefill engine and a decode engine in one process (offline API and tests).
"""
