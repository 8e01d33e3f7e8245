"""The OpenAI-compatible HTTP server: `build_app(async_engine, served_model_name, api_key)` -> FastAPI app."""
from tokenmill.server.app import build_app

__all__ = ["build_app"]
