"""The OpenAI-compatible HTTP server: `build_app(ModelRegistry([ServerState.create(async_engine, name)]))` -> app."""
from tokenmill.server.app import build_app
from tokenmill.server.models import ModelRegistry
from tokenmill.server.state import ServerState

__all__ = ["ModelRegistry", "ServerState", "build_app"]
