"""Schema-Guided Dialogue (``../shared/data/sgd``) as agent traces with tool calls.

Each service's intents become its tools (OpenAI function format): the intent's required slots are
required string arguments, its optional slots optional ones (their schema default kept as
``default``), categorical slots carry their possible values as an ``enum``. Every SYSTEM turn of a
dialogue becomes one trace whose conversation is everything said before it, earlier tool calls and
their results included:

* a turn whose frame has a ``service_call`` gives two traces: the call itself (an assistant message
  with ``tool_calls``), and then, with the call and its result (a ``tool`` message) appended, the
  system's reply;
* any other SYSTEM turn gives one trace answered with the system's reply.

A tool's result is ``{"count": n, "results": [...]}`` with at most ``--max-results`` of the
recorded ``service_results``. Each trace's metadata names the service, the dialogue, the turn, the
kind (``call``, ``reply_after_call``, ``reply``) and, for calls, how many arguments were already in
the dialogue state before the last user turn (``n_args_from_earlier_turns``, from the dataset's
state annotations).

    .venv/bin/python bench/sgd_traces.py --out bench/out/sgd   # writes train.jsonl and test.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import require_data, table

SERVICES = (
    "Banks_1",
    "Buses_1",
    "Events_1",
    "Flights_1",
    "Hotels_1",
    "Media_1",
    "Movies_1",
    "Music_1",
    "Restaurants_1",
    "RideSharing_1",
)
MAX_RESULTS = 2


def load_schema(root: Path) -> dict[str, dict[str, Any]]:
    return {s["service_name"]: s for s in json.loads((root / "schema.json").read_text())}


def service_tools(service: dict[str, Any]) -> list[dict[str, Any]]:
    """The service's intents as OpenAI tools."""
    slots = {s["name"]: s for s in service["slots"]}
    tools = []
    for intent in service["intents"]:
        props: dict[str, Any] = {}
        for name in [*intent["required_slots"], *intent["optional_slots"]]:
            slot = slots[name]
            prop: dict[str, Any] = {"type": "string", "description": slot["description"]}
            if slot["is_categorical"] and slot["possible_values"]:
                prop["enum"] = list(slot["possible_values"])
            if name in intent["optional_slots"]:
                prop["default"] = intent["optional_slots"][name]
            props[name] = prop
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": intent["name"],
                    "description": intent["description"],
                    "parameters": {
                        "type": "object",
                        "properties": props,
                        "required": list(intent["required_slots"]),
                        "additionalProperties": False,
                    },
                },
            }
        )
    return tools


def system_line(service: dict[str, Any]) -> str:
    """The system message every trace of a service starts with."""
    return f"You help the user: {service['description']}."


def tool_result(results: list[dict[str, Any]], max_results: int = MAX_RESULTS) -> str:
    """What a service's tool returns: the count and the first ``max_results`` results."""
    return json.dumps({"count": len(results), "results": results[:max_results]})


def _state(turn: dict[str, Any]) -> dict[str, list[str]]:
    for frame in turn["frames"]:
        if "state" in frame:
            return frame["state"].get("slot_values", {})
    return {}


def dialogue_traces(
    dialogue: dict[str, Any],
    service: dict[str, Any],
    tools: list[dict[str, Any]],
    *,
    max_results: int = MAX_RESULTS,
) -> Iterator[dict[str, Any]]:
    """One trace (an OpenAI chat fine-tuning line) per SYSTEM turn, two for a turn that calls."""
    system = {"role": "system", "content": system_line(service)}
    history: list[dict[str, Any]] = [system]
    before: dict[str, list[str]] = {}  # dialogue state before the last user turn
    state: dict[str, list[str]] = {}
    base = {"model": "sgd-recorded", "service": service["service_name"]}
    base["dialogue"] = dialogue["dialogue_id"]
    for i, turn in enumerate(dialogue["turns"]):
        if turn["speaker"] == "USER":
            before, state = state, _state(turn)
            history.append({"role": "user", "content": turn["utterance"]})
            continue
        reply = {"role": "assistant", "content": turn["utterance"]}
        frame = next((f for f in turn["frames"] if "service_call" in f), None)
        meta = {**base, "turn": i}
        if frame is not None:
            call = frame["service_call"]
            args = dict(call["parameters"])
            earlier = sum(1 for k, v in args.items() if v in before.get(k, []))
            call_id = f"call_{dialogue['dialogue_id']}_{i}"
            asked = {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call["method"], "arguments": json.dumps(args)},
                    }
                ],
            }
            results = frame.get("service_results", [])
            result = {
                "role": "tool",
                "tool_call_id": call_id,
                "content": tool_result(results, max_results),
            }
            yield {
                "messages": [*history, asked],
                "tools": tools,
                "metadata": {
                    **meta,
                    "kind": "call",
                    "n_args": len(args),
                    "n_args_from_earlier_turns": earlier,
                },
            }
            history += [asked, result]
            yield {
                "messages": [*history, reply],
                "tools": tools,
                "metadata": {**meta, "kind": "reply_after_call"},
            }
        else:
            yield {
                "messages": [*history, reply],
                "tools": tools,
                "metadata": {**meta, "kind": "reply"},
            }
        history.append(reply)


def split_traces(
    root: Path, split: str, services: tuple[str, ...] = SERVICES, max_results: int = MAX_RESULTS
) -> Iterator[dict[str, Any]]:
    """Every trace of one split (``train`` or ``test``), service by service."""
    schema = load_schema(root)
    for name in services:
        tools = service_tools(schema[name])
        for dialogue in json.loads((root / name / f"{split}.json").read_text()):
            yield from dialogue_traces(dialogue, schema[name], tools, max_results=max_results)


def write_split(
    root: Path, split: str, out: Path, services: tuple[str, ...] = SERVICES
) -> dict[str, dict[str, int]]:
    """Write one split's traces as JSONL; returns per-service counts."""
    counts: dict[str, dict[str, int]] = {}
    with open(out, "w", encoding="utf-8") as f:
        for trace in split_traces(root, split, services):
            c = counts.setdefault(trace["metadata"]["service"], {"traces": 0, "calls": 0})
            c["traces"] += 1
            c["calls"] += trace["metadata"]["kind"] == "call"
            f.write(json.dumps(trace, ensure_ascii=False) + "\n")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/out/sgd"))
    args = ap.parse_args()
    root = require_data("sgd")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("train", "test"):
        counts = write_split(root, split, args.out / f"{split}.jsonl")
        for name, c in counts.items():
            rows.append([split, name, c["traces"], c["calls"]])
        total = [sum(c[k] for c in counts.values()) for k in ("traces", "calls")]
        rows.append([split, "all", *total])
    print(table(["split", "service", "traces", "tool calls"], rows))


if __name__ == "__main__":
    main()
