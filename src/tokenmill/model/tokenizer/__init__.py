"""Text <-> token ids, built from a GGUF file's metadata or a Hugging Face tokenizer folder.

Both sources end up as a `tokenizers.Tokenizer` (fast, Rust) plus the few facts the engine needs around it:
which ids are BOS/EOS/pad, whether a prompt starts with BOS, which ids end a turn, and the chat template.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from tokenmill.errors import ModelLoadError, UnsupportedModelError
from tokenmill.model.chat_template import Message, render_chat_template
from tokenmill.model.tokenizer.byte_level import byte_level_bpe
from tokenmill.model.tokenizer.sentencepiece import sentencepiece_bpe

# Special tokens that end an assistant turn in the chat formats we know; llama.cpp treats the same texts as
# end-of-generation when the vocabulary marks them special.
_END_OF_TURN_TOKENS = frozenset(
    {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|end_of_text|>"}
)

# Fill-in-the-middle tokens (prefix, suffix, middle) of the code models we know.
_FIM_TOKENS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))

# `tokenizer.ggml.model` -> the builder of its backend (which also says llama.cpp's add-BOS default).
_GGUF_VOCABULARIES = {"gpt2": byte_level_bpe, "llama": sentencepiece_bpe}


class Tokenizer:
    """Wraps a tokenizers.Tokenizer plus the special-token facts the engine needs."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos: bool
    chat_template: str | None
    vocab_size: int
    stop_token_ids: set[int]

    def __init__(
        self,
        backend: tokenizers.Tokenizer | str,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        decoder: tokenizers.Tokenizer | None = None,
    ) -> None:
        """`backend`: the tokenizers library's tokenizer, or its JSON, then parsed when first needed (encoding);
        `decoder`: one that decodes alike at a fraction of the load time and memory (decoder_json), so an engine
        core, which only decodes, never parses the rest."""
        if add_bos and bos_token_id is None:
            raise ModelLoadError("the tokenizer asks for a BOS token at the start of prompts but defines none")
        self._backend_json = backend if isinstance(backend, str) else None
        if not isinstance(backend, str):
            self._backend = backend
        self._decoder = decoder if decoder is not None else self._backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = self._decoder.get_vocab_size(with_added_tokens=True)
        self.stop_token_ids = self._end_of_turn_ids() | set(extra_stop_ids)
        if eos_token_id is not None:
            self.stop_token_ids.add(eos_token_id)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/values (plain Python values, as `gguf.ReaderField.contents()` gives them)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None:
            raise ModelLoadError("the GGUF file has no tokenizer (no 'tokenizer.ggml.model' key)")
        if kind not in _GGUF_VOCABULARIES:
            raise UnsupportedModelError(
                f"GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; tokenmill reads "
                f"{' and '.join(map(repr, _GGUF_VOCABULARIES))} vocabularies"
            )
        backend, add_bos_default = _GGUF_VOCABULARIES[kind](metadata)
        return cls(
            backend,
            bos_token_id=_optional_int(metadata.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_optional_int(metadata.get("tokenizer.ggml.eos_token_id")),
            pad_token_id=_optional_int(metadata.get("tokenizer.ggml.padding_token_id")),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model folder: tokenizer.json, tokenizer_config.json and friends."""
        folder = Path(path)
        backend = _load_tokenizer_json(folder / "tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        model_eos_ids = _model_eos_ids(folder)
        bos_token_id = _config_token_id(backend, config, "bos_token")
        eos_token_id = _config_token_id(backend, config, "eos_token")
        if eos_token_id is None and model_eos_ids:
            eos_token_id = model_eos_ids[0]
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_prepends(backend, bos_token_id)
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=_config_token_id(backend, config, "pad_token"),
            add_bos=bool(add_bos),
            chat_template=_hf_chat_template(folder, config),
            extra_stop_ids=model_eos_ids,
        )

    @functools.cached_property
    def _backend(self) -> tokenizers.Tokenizer:
        return tokenizers.Tokenizer.from_str(self._backend_json)

    def backend_json(self) -> str:
        """The tokenizers library's JSON of the backend (what llguidance reads the vocabulary from)."""
        return self._backend_json if self._backend_json is not None else self._backend.to_str()

    def dumps(self) -> str:
        """This tokenizer as one JSON text (the backend's own JSON, its decoder_json and the special-token facts),
        for `loads`."""
        backend = self.backend_json()
        return json.dumps({"backend": backend, "decoder": decoder_json(backend), "bos_token_id": self.bos_token_id,
                           "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
                           "add_bos": self.add_bos, "chat_template": self.chat_template,
                           "stop_token_ids": sorted(self.stop_token_ids)})

    @classmethod
    def loads(cls, text: str, decode_only: bool = False) -> Tokenizer:
        """The tokenizer `dumps` wrote; decode_only: its decode-only twin, the rest parsed if ever used (an engine
        core only decodes: its requests come tokenized)."""
        facts = json.loads(text)
        backend, decoder = facts.pop("backend"), facts.pop("decoder")
        if decode_only and decoder is not None:
            return cls(backend, extra_stop_ids=facts.pop("stop_token_ids"),
                       decoder=tokenizers.Tokenizer.from_str(decoder), **facts)
        return cls(tokenizers.Tokenizer.from_str(backend), extra_stop_ids=facts.pop("stop_token_ids"), **facts)

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write tokenizer.json + tokenizer_config.json, so `from_hf_dir(folder)` rebuilds this tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
            "pad_token": self._token_text(self.pad_token_id),
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token texts in it become their single ids, as in transformers."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def fill_in_the_middle(self, prefix: str, suffix: str) -> list[int]:
        """The prompt asking the model for the text between `prefix` and `suffix`, in the prefix-suffix-middle order
        code models are trained on (Qwen2.5-Coder's <|fim_prefix|> ..., StarCoder's <fim_prefix> ...); a
        ValueError starting "suffix" for a vocabulary without such tokens."""
        for spelling in _FIM_TOKENS:
            ids = [self._decoder.token_to_id(token) for token in spelling]
            if None not in ids:
                pre, suf, mid = ids
                encode = functools.partial(self.encode, add_special_tokens=False)
                return [*([self.bos_token_id] if self.add_bos else []), pre, *encode(prefix), suf, *encode(suffix),
                        mid]
        raise ValueError("suffix needs a model trained for fill-in-the-middle; this vocabulary has no "
                         f"{' / '.join(s[0] for s in _FIM_TOKENS)} tokens")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._decoder.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Vocabulary spellings ('Ġworld' byte-level, '▁world' SentencePiece), for debugging and logprob displays."""
        return [self._decoder.id_to_token(token_id) for token_id in ids]

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, tokenize: bool = False,
        tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str | list[int]:
        """The prompt for `messages` (and `tools`, for templates that render them; the other options as
        render_chat_template takes them); when tokenized, no BOS is added, since templates write their own."""
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_id),
            tools=tools,
            continue_final_message=continue_final_message,
            template_kwargs=chat_template_kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._decoder.id_to_token(token_id)

    def _end_of_turn_ids(self) -> set[int]:
        return {
            token_id
            for token_id, token in self._decoder.get_added_tokens_decoder().items()
            if token.special and token.content in _END_OF_TURN_TOKENS
        }


def decoder_json(backend_json: str) -> str | None:
    """A tokenizer that decodes exactly as `backend_json`'s: the same vocabulary (as a WordLevel model, without the
    merges), added tokens and decoder, without what only encoding needs (normalizer, pre-tokenizer, merges), so it
    loads in a fraction of the time. None for a model that is not BPE (a Unigram vocabulary is a scored list)."""
    spec = json.loads(backend_json)
    if spec["model"].get("type") != "BPE":
        return None
    vocab = spec["model"]["vocab"]
    spec.update(model={"type": "WordLevel", "vocab": vocab, "unk_token": next(iter(vocab))}, normalizer=None,
                pre_tokenizer=None, post_processor=None)
    return json.dumps(spec, ensure_ascii=False)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    """The fast tokenizer, with any padding/truncation it was saved with turned off (we encode one text at a time)."""
    if not path.is_file():
        raise ModelLoadError(f"{path} not found; tokenmill needs the fast-tokenizer file tokenizer.json")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises plain Exception for bad files
        raise ModelLoadError(f"{path} is not a valid tokenizer.json: {error}") from error
    backend.no_padding()
    backend.no_truncation()
    return backend


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON config file's contents, or {} when the folder does not have it (all of them are optional)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def _config_token_id(backend: tokenizers.Tokenizer, config: Mapping[str, Any], name: str) -> int | None:
    """The id of a special token named in tokenizer_config.json, written as text or as an AddedToken dict."""
    token = config.get(name)
    if isinstance(token, Mapping):
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _model_eos_ids(folder: Path) -> list[int]:
    """EOS ids the model's generation_config.json and config.json declare; instruct models often list several."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(folder / name).get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return ids


def _post_processor_prepends(backend: tokenizers.Tokenizer, bos_token_id: int | None) -> bool:
    """Whether tokenizer.json's own post-processor adds BOS (Llama 3 says so there, not in tokenizer_config.json)."""
    return bos_token_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_token_id]


def _hf_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja (how transformers saves it now), else the template in tokenizer_config.json."""
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates; "default" is the one transformers uses
        template = next((entry["template"] for entry in template if entry.get("name") == "default"), None)
    return template
