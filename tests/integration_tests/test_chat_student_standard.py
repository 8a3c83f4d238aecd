"""langchain-tests standard suites for ChatStudent, tool calling on, against a real distilled GGUF.

The student (the ``tool_gguf`` fixture) was distilled from teacher traces that call the suites'
own tools, as an agent's traces would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_understudy.students import ChatStudent

pytestmark = pytest.mark.slow


class _Params:
    @pytest.fixture(autouse=True)
    def _gguf(self, tool_gguf: Path) -> None:
        type(self)._path = tool_gguf

    @property
    def chat_model_class(self) -> type[ChatStudent]:
        return ChatStudent

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # The test student is tiny: cap JSON strings so grammar-constrained answers (calls and
        # structured output alike) close within max_tokens.
        return {"model_path": type(self)._path, "n_ctx": 512, "json_max_string_length": 24}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # A local model has no timeout, retries or API key; it takes the rest.
        return {"temperature": 0, "max_tokens": 160, "stop": []}

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "function_calling"}

    @property
    def supports_model_override(self) -> bool:
        return False  # one student is one GGUF file; pick another with another ChatStudent

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": [], "stream": []}


class TestChatStudentUnit(_Params, ChatModelUnitTests):
    pass


class TestChatStudentIntegration(_Params, ChatModelIntegrationTests):
    pass
