"""Exceptions users can catch; each message names what was wrong and how to fix it."""


class TokenmillError(Exception):
    """Base class of every error tokenmill raises on purpose."""


class ModelLoadError(TokenmillError):
    """A model path is missing, unreadable or corrupt."""


class UnsupportedModelError(TokenmillError):
    """The model file is readable but uses an architecture, tokenizer or format tokenmill does not run."""


class ChatTemplateError(TokenmillError):
    """A conversation could not be turned into a prompt: no template, a template bug, or messages it rejects.
    `field`: the request option at fault (a server names it in its 400)."""

    def __init__(self, message: str, field: str = "messages") -> None:
        super().__init__(message)
        self.field = field
