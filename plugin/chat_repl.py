"""``understudy chat``: a terminal REPL over the routed understudy.

Answers stream as they are generated; after each one a status line says who answered (the local
student or the teacher) and why. Commands: ``/why`` (the full routing decision of the last answer),
``/facts`` (the facts the last answer was given; ``/facts QUERY`` searches the store), ``/reset``
(forget the conversation), ``/help`` and ``/exit``. Reads stdin and writes stdout, so tests and
scripts can drive it through pipes.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage

from langchain_understudy.errors import UnderstudyError

__all__ = ["ChatREPL"]

_HELP = """commands:
  /why            why the last answer came from the student or the teacher
  /facts [QUERY]  the facts given to the last answer, or search the knowledge store
  /reset          start a new conversation
  /exit           quit (Ctrl-D works too)"""


class ChatREPL:
    r"""A line-oriented chat loop over a :class:`~langchain_understudy.router.ChatUnderstudy`.

    Args:
        llm: The routed chat model.
        stdin: Where user lines are read from.
        stdout: Where answers and status lines are written.
        prompt: The input prompt (written only when ``stdin`` is a terminal, unless forced).
        show_prompt: Write the prompt even when ``stdin`` is not a terminal.

    Example:
        >>> import io
        >>> from langchain_understudy.plugin import load_understudy
        >>> repl = ChatREPL(load_understudy(), stdin=io.StringIO("hi\n/exit\n"))  # doctest: +SKIP
        >>> repl.run()  # doctest: +SKIP
        0
    """

    def __init__(
        self,
        llm: Any,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        prompt: str = "you> ",
        show_prompt: bool | None = None,
    ) -> None:
        self.llm = llm
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.prompt = prompt
        isatty = getattr(self.stdin, "isatty", lambda: False)
        self.show_prompt = bool(isatty()) if show_prompt is None else show_prompt
        self.history: list[BaseMessage] = []
        self.last_meta: dict[str, Any] | None = None

    # -- output ---------------------------------------------------------------------------------
    def _write(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    @property
    def has_teacher(self) -> bool:
        """Whether a teacher is configured at all."""
        return getattr(self.llm, "resilient_teacher", None) is not None

    def banner(self) -> str:
        """The first lines the REPL prints: which student, which teacher."""
        student = "unknown"
        try:
            model = self.llm.current_student()
            student = str(
                getattr(model, "student_version", None) or getattr(model, "_llm_type", "")
            )
        except (UnderstudyError, AttributeError):
            pass
        if self.has_teacher:
            teacher = self.llm.resilient_teacher.model_name
            where = f"teacher: {teacher} (hard questions are escalated to it)"
        else:
            where = (
                "no teacher configured: everything is answered locally, nothing leaves this machine"
            )
        return (
            f"understudy chat · student {student} · {where}\ntype /help for commands, /exit to quit"
        )

    @staticmethod
    def status_line(meta: dict[str, Any], has_teacher: bool) -> str:
        """One line saying who answered and why."""
        by = meta.get("answered_by", "?")
        ms = meta.get("latency_ms")
        lat = f" · {ms:.0f} ms" if isinstance(ms, (int, float)) else ""
        if by == "teacher":
            who = f"teacher {meta.get('teacher_model') or ''}".rstrip()
        else:
            who = (
                f"student {meta.get('student_version') or meta.get('student_model') or ''}".rstrip()
            )
        reason = meta.get("reason", "")
        extra = ""
        if meta.get("escalation_blocked"):
            if not has_teacher:
                extra = " · would have escalated, but no teacher is configured: answered locally"
            else:
                extra = f" · escalation blocked: {meta.get('blocked_reason')}"
        elif by == "student" and not has_teacher:
            extra = " · answered locally"
        return f"[{who}{lat} · {reason}{extra}]"

    # -- commands -------------------------------------------------------------------------------
    def _why(self) -> None:
        if self.last_meta is None:
            self._write("nothing answered yet")
            return
        m = self.last_meta
        keys = (
            "answered_by", "reason", "score", "threshold", "stage", "mode", "deciding_signals",
            "rule", "student_version", "teacher_model", "latency_ms", "router_overhead_ms",
            "escalation_blocked", "blocked_reason",
        )  # fmt: skip
        for k in keys:
            if k in m and m[k] not in (None, [], ""):
                self._write(f"  {k}: {m[k]}")
        for name, value in (m.get("signals") or {}).items():
            self._write(f"  signal {name} = {value:.3f}")
        for name, why in (m.get("absent") or {}).items():
            self._write(f"  signal {name}: absent ({why})")
        for name, why in (m.get("failed") or {}).items():
            self._write(f"  signal {name}: FAILED ({why})")

    def _facts(self, query: str) -> None:
        store = getattr(self.llm, "knowledge", None)
        if store is None:
            self._write("no knowledge store configured")
            return
        if query:
            pairs = store.similarity_search_with_relevance_scores(
                query, k=getattr(self.llm, "k", 4)
            )
            docs = [(d, s) for d, s in pairs]
        else:
            if self.last_meta is None:
                self._write("nothing answered yet; /facts QUERY searches the store")
                return
            keys = [k for k in self.last_meta.get("facts") or [] if k]
            if not keys:
                self._write("the last answer was given no facts")
                return
            got = store.get_by_ids(keys) if hasattr(store, "get_by_ids") else []
            docs = [(d, None) for d in got]
        if not docs:
            self._write("no facts found")
        for i, (doc, score) in enumerate(docs, 1):
            as_of = (doc.metadata or {}).get("as_of")
            tags = ", ".join(
                t
                for t in (doc.id, f"as of {as_of}" if as_of else None,
                          f"relevance {score:.2f}" if score is not None else None)
                if t
            )  # fmt: skip
            self._write(f"  [{i}] ({tags}) {doc.page_content}")

    # -- one turn -----------------------------------------------------------------------------------
    def ask(self, text: str) -> AIMessage | None:
        """Send one user turn, stream the answer, print the status line; returns the answer."""
        self.history.append(HumanMessage(text))
        full: AIMessageChunk | None = None
        try:
            for chunk in self.llm.stream(self.history):
                if isinstance(chunk.content, str) and chunk.content:
                    self.stdout.write(chunk.content)
                    self.stdout.flush()
                full = chunk if full is None else full + chunk
        except UnderstudyError as e:
            self.history.pop()
            self._write(f"\nerror: {e}")
            return None
        self._write()
        answer = AIMessage(
            content=full.content if full is not None else "",
            response_metadata=dict(full.response_metadata) if full is not None else {},
        )
        self.history.append(answer)
        meta = answer.response_metadata.get("understudy")
        self.last_meta = dict(meta) if isinstance(meta, dict) else None
        if self.last_meta is not None:
            self._write(self.status_line(self.last_meta, self.has_teacher))
        return answer

    def run(self) -> int:
        """Read lines until ``/exit`` or end of input; returns the exit code."""
        self._write(self.banner())
        while True:
            if self.show_prompt:
                self.stdout.write(self.prompt)
                self.stdout.flush()
            line = self.stdin.readline()
            if not line:
                self._write()
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                cmd, _, arg = text.partition(" ")
                if cmd in ("/exit", "/quit"):
                    return 0
                if cmd == "/why":
                    self._why()
                elif cmd == "/facts":
                    self._facts(arg.strip())
                elif cmd == "/reset":
                    self.history.clear()
                    self.last_meta = None
                    self._write("conversation cleared")
                elif cmd == "/help":
                    self._write(_HELP)
                elif cmd == "/json":  # machine-readable routing metadata of the last answer
                    self._write(json.dumps(self.last_meta, default=str, sort_keys=True))
                else:
                    self._write(f"unknown command {cmd}; {_HELP}")
                continue
            self.ask(text)
