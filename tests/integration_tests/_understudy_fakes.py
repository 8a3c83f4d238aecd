"""Small chat models standing in for a teacher in the ChatUnderstudy tests."""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

from langchain_understudy.prompting import message_text


class FakeTeacher(BaseChatModel):
    """Answers ``"teacher: <last message>"``; counts calls; can be told to fail."""

    model_name: str = "fake-teacher-1"
    fail: bool = False
    _calls: list[list[BaseMessage]] = PrivateAttr(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "fake-teacher"

    @property
    def calls(self) -> list[list[BaseMessage]]:
        return self._calls

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        with self._lock:
            self._calls.append(list(messages))
        if self.fail:
            msg = "503 Service Unavailable"
            raise ConnectionError(msg)
        text = f"teacher: {message_text(messages[-1])}"
        n_in = sum(len(message_text(m).split()) for m in messages)
        usage = UsageMetadata(input_tokens=n_in, output_tokens=len(text.split()),
                              total_tokens=n_in + len(text.split()))  # fmt: skip
        msg = AIMessage(
            content=text,
            response_metadata={"model_name": self.model_name, "finish_reason": "stop"},
            usage_metadata=usage,
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])
