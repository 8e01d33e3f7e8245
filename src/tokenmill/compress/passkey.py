"""Passkey retrieval (Mohtashami and Jaggi's long-context probe): a random number hidden at a given depth of
repetitive filler text, asked for at the end. The whole prompt goes through the engine as it serves (chunked
prefill into the KV cache, so a compressed cache holds the number by the time it is asked for); greedy decoding
must write the number back."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from tokenmill.llm import LLM

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about it.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyTrial:
    length: int  # prompt tokens asked for (the prompt is within a sentence of it)
    depth: float  # where the key sits, as a fraction of the filler
    key: int
    prompt_tokens: int
    answer: str

    @property
    def found(self) -> bool:
        return str(self.key) in self.answer


def passkey_prompt(llm: LLM, length: int, depth: float, key: int) -> str:
    """About `length` tokens: the intro, filler with the key's sentence at `depth`, the question."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(llm.tokenizer.encode(INTRO + needle + QUESTION))
    per_filler = len(llm.tokenizer.encode(FILLER * 10)) / 10
    repeats = max(1, int((length - fixed) / per_filler))
    before = round(repeats * depth)
    return INTRO + FILLER * before + needle + FILLER * (repeats - before) + QUESTION


def run_passkey(llm: LLM, lengths: list[int], depths: list[float], seed: int = 0,
                progress: bool = False) -> list[PasskeyTrial]:
    from tokenmill.sampling_params import SamplingParams

    rng = random.Random(seed)
    cases = [(length, depth, rng.randrange(10_000, 100_000)) for length in lengths for depth in depths]
    params = SamplingParams(temperature=0, max_tokens=12)
    trials = []
    for length, depth, key in tqdm(cases, desc="passkey", unit="prompt", disable=not progress):
        prompt = passkey_prompt(llm, length, depth, key)
        out = llm.generate([prompt], params)[0]
        trials.append(PasskeyTrial(length, depth, key, len(out.prompt_token_ids), out.outputs[0].text))
    return trials
