"""Serving NExT-GPT over HTTP: an OpenAI-compatible chat-completions API with streaming.

Import `nextgpt.serving.app.create_app` for the FastAPI app; `nextgpt serve` runs it with uvicorn.
This package's `__init__` stays import-free so that the CLI can list commands without loading
FastAPI or the model.
"""
