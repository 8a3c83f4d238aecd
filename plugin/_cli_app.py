"""``understudy init | chat | serve | demo``: the commands users run first."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["STARTER_CONFIG", "register"]

STARTER_CONFIG = """\
# understudy.toml: one file wires the student, the knowledge store, the router and the teacher.
# Every value can be overridden by an environment variable: UNDERSTUDY_<SECTION>__<FIELD>,
# e.g. UNDERSTUDY_ROUTER__THRESHOLD=0.4 or UNDERSTUDY_TEACHER__KIND=openai.
# Relative paths are relative to this file.

[student]
# Student registry: `understudy distill run` registers students here; the promoted one is served.
registry = ".understudy/students"
# Or serve one GGUF file directly instead of the registry's promoted version:
# model_path = "student.Q8_0.gguf"
n_ctx = 2048            # context window in tokens (at most what the student was trained for)
max_tokens = 256        # default cap on generated tokens
temperature = 0.0       # 0 = greedy, deterministic
n_gpu_layers = 0        # layers offloaded to a GPU (-1 = all); needs a CUDA/Metal llama.cpp build
# n_threads = 4         # CPU threads (default: llama.cpp decides)
overflow = "truncate"   # conversation longer than n_ctx: "truncate" oldest turns or "error"
n_parallel = 4          # requests decoded together in one llama.cpp context (KV: n_ctx each)

[knowledge]
# Folder of the knowledge store (FAISS + SQLite); fill it with `understudy kb add`.
# Comment it out to run without retrieval.
path = ".understudy/knowledge"
index = "flat"          # "flat" (exact), "hnsw" or "ivf", for a new store
# Which facts the student reads follows what the served student was trained with (its registry
# entry records it); set these only to override that.
# k = 4                 # facts per turn
# distinct_by = "answer"  # only the most relevant fact per value of this metadata key
# fact_details = true   # show each fact's key and date
min_relevance = 0.0     # facts below this relevance (0..1) are not shown to the student
# embedding_model = "/path/to/sentence-transformers-model"  # default: bundled all-MiniLM-L6-v2

[teacher]
# "none": everything is answered locally, nothing leaves the machine.
# "openai": any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama, ...).
# "gguf": a larger local GGUF model.  "import": factory = "my_module:make_teacher".
kind = "none"
model = "gpt-4o-mini"
# base_url = "http://127.0.0.1:11434/v1"   # e.g. Ollama; omit for api.openai.com
api_key_env = "OPENAI_API_KEY"            # the key itself never goes in this file
# path = "teacher.gguf"                    # for kind = "gguf"
# factory = "my_module:make_teacher"       # for kind = "import"
timeout_s = 60.0
max_retries = 2
# calls_per_minute = 60                    # budget; beyond it the student answers
# calls_per_day = 5000

[router]
mode = "auto"           # "pre": decide before generating, "cascade": after, "auto": both
threshold = 0.5         # escalate when the escalation score (0..1) is at or above this
always_teacher_patterns = []   # regexes: matching conversations always go to the teacher
never_teacher_patterns = []    # regexes: matching conversations never leave the machine
private_tags = ["private"]     # run tags that forbid escalation
block_pii = true               # never send conversations containing PII to the teacher
# audit_log = ".understudy/audit.jsonl"    # one JSON line per routing decision

[traces]
path = ".understudy/traces.sqlite"   # teacher answers are recorded here for the next distillation
redact = true                         # redact PII before anything is written

[server]
host = "127.0.0.1"      # anything but loopback requires the API key variable to be set
port = 8321
api_key_env = "UNDERSTUDY_API_KEY"
max_request_bytes = 1000000
max_tokens_limit = 2048
"""


def write_starter(path: Path, text: str, *, force: bool) -> bool:
    """Write a starter file unless it exists (and ``force`` is off); say what happened."""
    if path.exists() and not force:
        print(f"error: {path} already exists; pass --force to overwrite it", file=sys.stderr)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return True


def _init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not write_starter(path, STARTER_CONFIG, force=args.force):
        return 1
    print("next: `understudy demo` to see the whole loop, or fill the knowledge store with")
    print(f"`understudy kb add FILES`, record traces, and `understudy chat --config {path}`")
    return 0


def _llm(args: argparse.Namespace) -> object:
    from langchain_understudy.plugin.loader import load_understudy

    return load_understudy(args.config)


def _chat(args: argparse.Namespace) -> int:
    from langchain_understudy.plugin.chat_repl import ChatREPL

    return ChatREPL(_llm(args)).run()


def _serve(args: argparse.Namespace) -> int:
    import os

    from langchain_understudy.plugin.loader import load_understudy, resolve_config
    from langchain_understudy.plugin.server import check_bind, serve

    cfg = resolve_config(args.config)
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port
    # refuse an unsafe bind before spending time loading models
    check_bind(host, os.environ.get(cfg.server.api_key_env), cfg.server.api_key_env)
    llm = load_understudy(cfg)
    guard = getattr(llm, "resilient_teacher", None)
    teacher = guard.model_name if guard is not None else "none (everything answered locally)"
    print(f"understudy serving on http://{host}:{port}/v1  (teacher: {teacher})", flush=True)
    print("point any OpenAI client at that base_url; Ctrl-C stops", flush=True)
    serve(llm, settings=cfg.server, host=host, port=port)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from langchain_understudy.plugin.demo import run_demo

    result = run_demo(args.dir, quick=args.quick, config=args.config)
    return 0 if result.ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``init``, ``chat``, ``serve`` and ``demo``."""
    p = sub.add_parser("init", help="write a commented starter understudy.toml")
    p.add_argument("path", nargs="?", default="understudy.toml", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_init)

    p = sub.add_parser("chat", help="chat with the understudy in the terminal")
    p.add_argument("--config", type=Path, help="understudy.toml (default: ./understudy.toml)")
    p.set_defaults(func=_chat)

    p = sub.add_parser("serve", help="serve an OpenAI-compatible API (/v1/chat/completions)")
    p.add_argument("--config", type=Path, help="understudy.toml (default: ./understudy.toml)")
    p.add_argument("--host", help="bind address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default: server.port, 8321)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="run the whole loop offline on a fictional company (~3 min)")
    p.add_argument("--dir", type=Path, default=Path("understudy-demo"), help="work folder")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test)")
    p.add_argument(
        "--config",
        type=Path,
        help="understudy.toml whose [teacher] replaces the stand-in teacher "
        "(default: ./understudy.toml when it configures one)",
    )
    p.set_defaults(func=_demo)
