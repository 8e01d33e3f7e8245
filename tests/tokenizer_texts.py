"""The varied text set every tokenizer is checked on, and the conversations chat templates are checked on."""

TEXTS = [
    "Hello, world! This is a simple English sentence.",
    "The year 2024 had 366 days; pi is 3.14159 and 1,000,000 is a million.",
    "I'm sure they'll've done it, don't you think? It's John's.",
    "Café déjà vu — naïve façade, Ångström, São Paulo, Zürich, ŒUVRE.",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 rainbow flag 🏳️‍🌈 ❤️ ✨",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n    def bar(self):\n        pass\n",
    "lots   of    spaces     here   ",
    "tabs\tand\nnewlines\r\n\n\n\tmixed \t \n end",
    "   ",
    "\n",
    " leading space",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <repo_name>x<file_sep> too",
    "",
]

# Whitespace runs before a digit: GPT-2's split gives the last blank to the digit's word, SmolLM2's keeps the run whole.
DIGITS_AFTER_WHITESPACE = ["x =  1", "def f():\n    1 + 1", "a\n\n2", "price:\t\t3"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
    ],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
    ],
]

# Where SentencePiece vocabularies differ most: space and newline runs, pieces spelled with '▁', special tokens.
SENTENCEPIECE_TEXTS = [
    "  two leading spaces",
    "trailing spaces   ",
    "a  \n\n  b\n\n\n\nc",
    " \n \n",
    "\u2581already an underline \u2581\u2581",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ and control \x00\x07 chars",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos> <pad>",
]
