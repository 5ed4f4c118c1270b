#!/usr/bin/env python3
"""llm-serve.py [--embedding] MODEL.gguf [PORT] — serve a GGUF with xllamacpp's embedded
llama.cpp server (OpenAI-compatible /v1/chat/completions, tools included; with --embedding,
/v1/embeddings of a sentence-embedding model such as the one `embed-install` makes).

Needs PYTHONPATH pointing at the directory filled by `llm-install` (or `embed-install`).
Listens on 127.0.0.1:PORT (0 or omitted = a free port). When the model is
loaded and /health answers 200, prints exactly one line to stdout, the base
URL (e.g. http://127.0.0.1:41234/v1), then runs until SIGTERM/SIGINT.
All logging goes to stderr.
"""
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

# ChatML template for Qwen2.5-Coder that makes llama.cpp's tool-call parser
# work: tools are listed in the system message, a call is a fenced ```json
# block {"name": ..., "arguments": {...}}, earlier calls are rendered the same
# way (llama.cpp derives the parser by rendering the template with a sample
# tool call), and tool results come back as a user turn asking for plain text.
CHAT_TEMPLATE = r"""
{%- macro text(c) -%}
  {%- if c is string -%}{{- c -}}
  {%- elif c is iterable -%}
    {%- for p in c -%}{%- if p.text is defined -%}{{- p.text -}}{%- endif -%}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro call(tc) -%}
  {%- set f = tc.function if tc.function is defined else tc -%}
  {{- '```json\n{"name": "' + f.name + '", "arguments": ' -}}
  {%- if f.arguments is string -%}{{- f.arguments -}}{%- else -%}{{- f.arguments | tojson -}}{%- endif -%}
  {{- '}\n```' -}}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set sys = text(messages[0].content) -%}
  {%- set rest = messages[1:] -%}
{%- else -%}
  {%- set sys = 'You are a helpful assistant.' -%}
  {%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + sys -}}
{%- if tools -%}
  {{- '\n\n# Tools\n\nYou can call these tools (JSON schemas):' -}}
  {%- for t in tools -%}
    {{- '\n' + ((t.function if t.function is defined else t) | tojson) -}}
  {%- endfor -%}
  {{- '\n\nTo call a tool, your whole reply must be one Markdown code block that starts with ```json and ends with ```, holding {"name": <tool name>, "arguments": <JSON object>}. Example:\n```json\n{"name": "<tool name>", "arguments": {"<parameter>": "<value>"}}\n```\nOnly call a tool when the user\'s request needs it; otherwise answer in plain text.' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for m in rest -%}
  {%- if m.role == 'assistant' -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if m.content -%}{{- text(m.content) -}}{%- endif -%}
    {%- if m.tool_calls -%}
      {%- for tc in m.tool_calls -%}
        {%- if m.content or not loop.first -%}{{- '\n' -}}{%- endif -%}
        {{- call(tc) -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {{- '<|im_start|>user\nThe tool returned: ' + text(m.content) + '\nThe tool call is done. In one or two plain sentences, tell me what you did and answer my original request. Do not call a tool and do not repeat the raw result.<|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + text(m.content) + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


def main() -> int:
    args = sys.argv[1:]
    embedding = bool(args) and args[0] == "--embedding"
    if embedding:
        args = args[1:]
    if len(args) not in (1, 2):
        print("usage: llm-serve.py [--embedding] MODEL.gguf [PORT]", file=sys.stderr)
        return 2
    model = os.path.abspath(args[0])
    port = int(args[1]) if len(args) == 2 else 0
    if not os.path.isfile(model):
        print(f"llm-serve: no such model file: {model}", file=sys.stderr)
        return 2

    # llama.cpp writes some logs to stdout; keep our stdout for the URL only.
    url_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = model
    p.model_alias = {"local"}   # a set of names; a str would be split into chars
    p.hostnames = ["127.0.0.1"]
    p.port = port
    p.n_ctx = 4096
    p.n_parallel = 2
    p.kv_unified = True          # one long request may use the whole n_ctx
    p.cpuparams.n_threads = 2
    p.cpuparams_batch.n_threads = 2
    p.sampling.seed = 42
    p.sampling.temp = 0.2        # default when a request sets none; steadier tool-call format
    p.use_jinja = True
    p.chat_template = CHAT_TEMPLATE
    p.ui = False                 # no web UI
    p.cache_ram_mib = 256        # bound the host-RAM prompt cache
    if embedding:
        # The pooling the GGUF names (mean for all-MiniLM-L6-v2). A non-causal model needs a
        # whole input in one batch: inputs of up to 512 tokens, four at a time. One thread was
        # steady on two cores; two were erratic.
        p.embedding = True
        p.n_ctx = 2048
        p.n_parallel = 4
        p.kv_unified = False
        p.n_batch = 512
        p.n_ubatch = 512
        p.cpuparams.n_threads = 1
        p.cpuparams_batch.n_threads = 1
        p.use_jinja = False
        p.chat_template = ""
        p.warmup = False

    try:
        server = xllamacpp.Server(p)  # loads the model, then serves in the background
    except RuntimeError as e:         # e.g. the port is taken
        print(f"llm-serve: {e}", file=sys.stderr)
        return 1
    addr = str(server.listening_address).rstrip("/")
    if not addr.startswith("http"):
        addr = "http://" + addr

    # Print the URL only once the model answers /health with 200.
    deadline = time.monotonic() + 300
    while not stop.is_set():
        try:
            with urllib.request.urlopen(addr + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            print("llm-serve: server did not become healthy", file=sys.stderr)
            return 1
        time.sleep(0.1)

    if not stop.is_set():
        url_out.write(addr + "/v1\n")
        url_out.flush()
        while not stop.wait(1.0):
            pass

    print("llm-serve: shutting down", file=sys.stderr)
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
