#!/usr/bin/env python3
"""Writes small reference tokenizers, and what Hugging Face transformers makes of them, under
tests/fixtures/reference/tokenizers/<name>/.

Five folders, each a tokenizer with the real structure of one model family, trained with the
`tokenizers` library on the few KB of English text in CORPUS below (vocabularies of ~300-500 tokens),
wrapped in the family's transformers class and written with `save_pretrained`:

  llama3         byte-level BPE with Llama 3's split regex, <|begin_of_text|> prepended by a
                 TemplateProcessing post-processor; bos <|begin_of_text|>, eos <|eot_id|>;
                 tokenizer_class "PreTrainedTokenizerFast"; Llama-3.2-Instruct's chat template.
  qwen2.5        byte-level BPE with Qwen2's regex and NFC; no BOS (bos_token null), eos <|im_end|>,
                 pad <|endoftext|>; tokenizer_class "Qwen2Tokenizer"; Qwen2.5-Instruct's chat template.
  smollm2        byte-level BPE (Digits + ByteLevel pre-tokenizer) with <|endoftext|> <|im_start|>
                 <|im_end|> at ids 0-2; bos <|im_start|>, eos <|im_end|>, no BOS added;
                 tokenizer_class "GPT2Tokenizer"; SmolLM2-Instruct's chat template.
  llama2         SentencePiece-style BPE (Metaspace "first", byte fallback, <unk> <s> </s> and the
                 <0x00>..<0xFF> byte pieces at ids 0-258); tokenizer_class "LlamaTokenizer",
                 add_bos_token true; no chat template.
  llama2-no-bos  the same tokenizer saved with add_bos_token false.

Each folder holds tokenizer.json, tokenizer_config.json, chat_template.jinja (where there is a
template: transformers 5 writes it there rather than into tokenizer_config.json) and reference.json:
the bos/eos tokens, `AutoTokenizer.from_pretrained(folder)(text)["input_ids"]` for six texts, a set of
`decode` results with and without skip_special_tokens, and `apply_chat_template` text and ids for four
conversations. The chat templates are the real ones, verbatim (see TEMPLATES for where each came from).

How transformers 5 treats add_bos_token / add_eos_token: `from_pretrained` drops both keys from
tokenizer_config.json whenever a tokenizer.json is present (for every tokenizer_class: LlamaTokenizer,
PreTrainedTokenizerFast, TokenizersBackend or none), so the post-processor stored in tokenizer.json
alone decides whether BOS/EOS are added. Only an explicit `from_pretrained(..., add_bos_token=...)` or
`add_eos_token=...` argument rewrites it, as a TemplateProcessing built from both flags (an unset one
counts as false). `save_pretrained` no longer writes the keys either, so this script writes them back
into the llama2 folders' tokenizer_config.json as a real Llama 2 download has them, and saves each llama2
folder from a LlamaTokenizer built with that add_bos_token, so that its tokenizer.json post-processor
agrees with its config, as in a download saved by transformers.

Classes with their own constructor (LlamaTokenizer, Qwen2Tokenizer, GPT2Tokenizer) take only the
vocabulary, the merges and the post-processor from tokenizer.json and rebuild the normalizer,
pre-tokenizer and decoder themselves. The folders here are laid out as those classes build them, and
the script checks that the `tokenizers` library reading tokenizer.json alone gives every id and decoded
text that transformers gives. (Real downloads can differ: GPT2Tokenizer drops SmolLM2's Digits
pre-tokenizer, which changes the ids where two or more spaces precede a digit, as in "x  1", a case no
text here contains; LlamaTokenizer replaces Llama 2's Prepend/Replace normalizer with Metaspace "first".)

Run from the repository root, in a virtual environment:

    python3 -m venv .venv && .venv/bin/pip install "transformers>=5" tokenizers jinja2
    .venv/bin/python scripts/make-reference-tokenizers.py

Needs transformers 5 (written against 5.25, with tokenizers 0.23) and no network: nothing is
downloaded from a model hub. The output is deterministic for given versions of transformers and
tokenizers (reference.json records both); each run deletes and rewrites tests/fixtures/reference/tokenizers/.
"""
import os

# BPE training is deterministic, but keep it on one thread so nothing depends on scheduling.
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hashlib
import json
import shutil
import sys
from pathlib import Path

import tokenizers
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "reference" / "tokenizers"

# Training text: varied English (prose, dialogue, numbers, code, a few accented words), a few KB.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was a bright cold day in April, and the clocks were striking thirteen. The weather forecast said
rain in the morning and sunshine in the afternoon, so we packed umbrellas and sunglasses together.

"Where are you going?" she asked. "To the market," he replied, "to buy bread, cheese and apples."
"Don't forget the milk!" she called after him. He didn't forget; he never forgets the milk.
I'm sure they'll be there by noon. We've seen it before, and you're right: it's easier than it looks.

Our small team builds software that runs on many computers at once. Each node serves a few layers of
a language model, and the nodes talk to each other over the network. When one node fails, another one
takes its place, and the user never notices. Tokens go in, tokens come out, and the answer appears.

Recipe for pancakes: mix 200 grams of flour, 2 eggs, 300 millilitres of milk and a pinch of salt.
Heat a pan, pour in a ladle of batter, cook for 1 or 2 minutes on each side, then serve with lemon.
The meeting is at 10:30 on 12 March 2024, in room 4B. Tickets cost $15.99 each, or 3 for $40.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

if value is None:
    raise ValueError("value must not be None")

Mathematics is the language of nature: 1 + 1 = 2, 3 * 4 = 12, and 2 ** 10 = 1024. The ratio of a
circle's circumference to its diameter is about 3.14159, and the square root of two is near 1.41421.

History tells of kings and queens, of farmers and sailors, of cities that rose and fell. The library
held thousands of books about science, art, music, poetry, travel and the stars in the night sky.
Children played in the park while their parents talked about work, school, holidays and the news.

She ordered a café au lait and a croissant at the little café near the station. His résumé listed a
naïve but charming project about a piñata factory; the façade of the old building was being repaired.
Déjà vu is the feeling that you have lived through the present moment before. Touché, said the fencer.

Questions? Answers! Lists, commas, semicolons; colons: dashes - and quotes 'single' and "double".
Email me at someone@example.com or visit https://example.com/docs/index.html for more information.
The year 1999 ended, and 2000 began; in 2010 and 2020 the world changed again, as it always does.

Good morning! How are you today? I am fine, thank you. What would you like to learn about?
Please explain how a tokenizer splits text into pieces, and why the pieces matter to the model.
A tokenizer maps text to numbers; a decoder maps the numbers back to text, ideally without loss.
"""

# Texts encoded for reference.json; the sixth holds the text of one of the family's special tokens.
COMMON_TEXTS = [
    "Hello world! The meeting is at 10:30, and tickets cost $15.99 (or 12345 for all).",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented after a tab\n",
    "Café, naïve résumé; déjà vu — Über straße.",
    "日本語のテキスト and 中文 with emoji 😀🚀!",
]
# Encoded only to give a decode case for clean_up_tokenization_spaces (see reference "decode").
CLEANUP_TEXT = "Wait , what ? I can 't do that . He 's sure they 're right !"

CONVERSATIONS = [
    # (messages, add_generation_prompt)
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    (
        [
            {"role": "system", "content": "You are a concise assistant.\n"},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Japan? Café 😀  "},
        ],
        True,
    ),
    ([{"role": "user", "content": "Say hello."}], False),
]

# Llama 3's pre-tokenizer regex, as in its tokenizer.json.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 / Qwen2.5's pre-tokenizer regex, as in its tokenizer.json (and transformers' Qwen2Tokenizer).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The real chat templates, verbatim. Hub downloads are out of reach, so each was taken from a public
# GitHub copy that records the template stored in the model's GGUF conversion (a GGUF's
# tokenizer.chat_template is the chat_template of the model's tokenizer_config.json, copied unchanged):
#   huggingface/huggingface.js, packages/ollama-utils/src/chat-template-automap.ts
#   (commit fe42e68017ffc76d09922ea8f9b38a6964345710), the "gguf" string of the entries
#   library/llama3.2:3b  (meta-llama/Llama-3.2-3B-Instruct; the same template as Llama-3.2-1B-Instruct),
#   library/qwen2.5:0.5b (Qwen/Qwen2.5-0.5B-Instruct),
#   library/smollm2:135m (HuggingFaceTB/SmolLM2-135M-Instruct).
# Read against other public copies (by eye): a C++ test table quoting the templates of the
# Qwen/Qwen2.5-0.5B-Instruct and meta-llama/Llama-3.2-1B-Instruct GGUFs, and a Kotlin test quoting
# SmolLM2's shipped chat_template.jinja. (huggingface.js's packages/jinja/test/e2e.test.js has a
# "Qwen/Qwen2.5-7B-Instruct" template that differs from these in one place, `{"name": ...}` for
# `{{"name": ...}}` in the tools prompt; the GGUF copies agree with each other, so they are used.)
# TEMPLATE_SHA256 guards against an accidental edit.
TEMPLATES = {}

TEMPLATES["llama3"] = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

TEMPLATES["qwen2.5"] = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

TEMPLATES["smollm2"] = r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"""

TEMPLATE_SHA256 = {
    "llama3": "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
    "qwen2.5": "d5495a1e5db0611132a97e46a65dbb64a642a499421228b9c8b93229097fa9a4",
    "smollm2": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
}


# ---------------------------------------------------------------------------------------------------
# Training


def corpus_lines():
    return [line for line in CORPUS.splitlines() if line.strip()]


def train_bpe(pre_tokenizer, vocab_size, normalizer=None, byte_level=False, special_tokens=()):
    """Trains a BPE model on CORPUS; returns (vocab {token: id}, merges [(a, b)])."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def with_component(tok, key, value):
    """Returns a copy of `tok` with one top-level tokenizer.json component replaced."""
    data = json.loads(tok.to_str())
    data[key] = value
    return Tokenizer.from_str(json.dumps(data))


def specials(*names):
    return [AddedToken(n, special=True, normalized=False) for n in names]


# ---------------------------------------------------------------------------------------------------
# The five tokenizers


def build_llama3(folder):
    """Byte-level BPE laid out like Llama 3's tokenizer.json (specials after the BPE vocabulary)."""
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
    vocab, merges = train_bpe(
        pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        vocab_size=420,
        byte_level=True,
    )
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True)
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens(
        specials("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    )
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos_id)],
            ),
        ]
    )
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
        chat_template=TEMPLATES["llama3"],
    )
    wrapped.save_pretrained(folder)
    # transformers 5 saves the class as "TokenizersBackend"; Llama 3 downloads name the alias.
    patch_config(folder, tokenizer_class="PreTrainedTokenizerFast")


def build_qwen(folder):
    """Byte-level BPE laid out like Qwen2.5's tokenizer.json (NFC, Qwen2 regex, specials at the end)."""
    split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
    byte_level = dict(add_prefix_space=False, trim_offsets=False, use_regex=False)
    vocab, merges = train_bpe(
        pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(**byte_level)]),
        vocab_size=440,
        normalizer=normalizers.NFC(),
        byte_level=True,
    )
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(**byte_level)])
    tok.post_processor = processors.ByteLevel(**byte_level)
    tok.add_special_tokens(specials("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    # decoders.ByteLevel() takes no options from Python; Qwen2.5's tokenizer.json spells them out.
    tok = with_component(tok, "decoder", {"type": "ByteLevel", **byte_level})
    wrapped = transformers.Qwen2Tokenizer(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        chat_template=TEMPLATES["qwen2.5"],
    )
    wrapped.save_pretrained(folder)


def build_smollm2(folder):
    """Byte-level BPE laid out like SmolLM2's tokenizer.json (Digits + ByteLevel, specials at ids 0-2)."""
    names = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    vocab, merges = train_bpe(pre, vocab_size=400, byte_level=True, special_tokens=names)
    assert [vocab[n] for n in names] == [0, 1, 2], vocab
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens(specials(*names))
    wrapped = transformers.GPT2Tokenizer(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
        chat_template=TEMPLATES["smollm2"],
    )
    wrapped.save_pretrained(folder)


def build_llama2(folder, add_bos_token):
    """SentencePiece-style BPE laid out like Llama 2: <unk> <s> </s>, then the 256 byte pieces, then
    the trained pieces; built by transformers' own LlamaTokenizer (Metaspace "first", byte fallback)."""
    trained, merges = train_bpe(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True), vocab_size=230
    )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    wrapped = transformers.LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=add_bos_token,
        add_eos_token=False,
        legacy=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    wrapped.save_pretrained(folder)
    # transformers 5 no longer saves these keys (nor reads the first two, see the docstring); Llama 2
    # downloads have them.
    patch_config(folder, add_bos_token=add_bos_token, add_eos_token=False, legacy=False)


def patch_config(folder, **changes):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


FAMILIES = [
    # name, builder, text holding a special token's text, extra template context
    ("llama3", build_llama3, "Stop at <|eot_id|> please; <|begin_of_text|> is the BOS.", {"date_string": "26 Jul 2024"}),
    ("qwen2.5", build_qwen, "User said: <|im_end|> then <|im_start|>assistant", {}),
    ("smollm2", build_smollm2, "User said: <|im_end|> then <|im_start|>assistant", {}),
    ("llama2", lambda f: build_llama2(f, True), "Sentence one.</s><s> Sentence two <unk>", {}),
    ("llama2-no-bos", lambda f: build_llama2(f, False), "Sentence one.</s><s> Sentence two <unk>", {}),
]


# ---------------------------------------------------------------------------------------------------
# Reference outputs


def reference(name, folder, special_text, extra_context):
    tok = AutoTokenizer.from_pretrained(folder)
    texts = COMMON_TEXTS + [special_text]
    encode = [{"text": t, "ids": tok(t)["input_ids"]} for t in texts]

    chat = []
    if tok.chat_template is not None:
        for messages, add_generation_prompt in CONVERSATIONS:
            text = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra_context
            )
            ids = tok.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt, **extra_context
            )["input_ids"]
            entry = {"messages": messages, "add_generation_prompt": add_generation_prompt}
            if extra_context:
                entry["extra_context"] = extra_context
            entry.update({"text": text, "ids": ids})
            chat.append(entry)

    decode_ids = [e["ids"] for e in encode]
    decode_ids.append(tok(CLEANUP_TEXT)["input_ids"])
    if chat:
        decode_ids.append(chat[2]["ids"])
    # An incomplete UTF-8 sequence: the emoji's tokens without the last one.
    emoji = tok("😀", add_special_tokens=False)["input_ids"]
    decode_ids.append(emoji[:-1])
    decode = []
    for ids in decode_ids:
        for skip in (True, False):
            decode.append({"ids": ids, "skip_special_tokens": skip, "text": tok.decode(ids, skip_special_tokens=skip)})

    return {
        "name": name,
        "generated_by": "scripts/make-reference-tokenizers.py",
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "tokenizer_class": type(tok).__name__,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "encode": encode,
        "decode": decode,
        "chat": chat,
    }


def check(name, folder, ref):
    """The saved tokenizer.json, read by `tokenizers` alone, must give the ids transformers gives."""
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for e in ref["encode"]:
        got = raw.encode(e["text"]).ids
        if got != e["ids"]:
            raise SystemExit(f"{name}: tokenizer.json and transformers disagree on {e['text']!r}:\n{got}\n{e['ids']}")
    for c in ref["chat"]:
        if raw.encode(c["text"], add_special_tokens=False).ids != c["ids"]:
            raise SystemExit(f"{name}: chat ids differ from tokenizer.json's encoding of the chat text")
    for d in ref["decode"]:
        if raw.decode(d["ids"], skip_special_tokens=d["skip_special_tokens"]) != d["text"]:
            raise SystemExit(f"{name}: tokenizer.json and transformers decode {d['ids']} differently")
    template = folder / "chat_template.jinja"
    if name in TEMPLATES:
        if hashlib.sha256(template.read_bytes()).hexdigest() != TEMPLATE_SHA256[name]:
            raise SystemExit(f"{name}: chat_template.jinja is not the verbatim template")
    elif template.exists():
        raise SystemExit(f"{name}: unexpected chat_template.jinja")


def main():
    if int(transformers.__version__.split(".")[0]) < 5:
        raise SystemExit(f"needs transformers 5, found {transformers.__version__}")
    for name, text in TEMPLATES.items():
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != TEMPLATE_SHA256[name]:
            raise SystemExit(f"the {name} chat template in this script was edited")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name, build, special_text, extra_context in FAMILIES:
        folder = OUT / name
        build(folder)
        ref = reference(name, folder, special_text, extra_context)
        (folder / "reference.json").write_text(
            json.dumps(ref, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        check(name, folder, ref)
    total = 0
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            total += path.stat().st_size
            print(f"{path.stat().st_size:>8}  {path.relative_to(ROOT)}")
    print(f"{total:>8}  total")


if __name__ == "__main__":
    sys.exit(main())
