"""`lorakit serve`: an OpenAI-compatible HTTP server for many adapters on one base model.

Requests for different adapters share one continuous batch: each row of a decode step reads its own adapter
slot of per-layer stacks (adapters.py), rows of different lengths share a slot-based KV cache (cache.py), one
engine thread admits new requests between decode steps (engine.py), and FastAPI routes speak the OpenAI API
and vLLM's adapter endpoints (app.py, protocol.py). `server.py` holds the command's options and entry point.
Nothing here is imported by `import lorakit`: FastAPI and uvicorn are the optional `serve` extra.
"""
