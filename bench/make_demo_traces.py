"""Generate the demo's bundled data: a fictional company's dated facts and its teacher traces.

Writes, into ``plugin/demo_data/``:

* ``company.json``: the company's fact schema (keys, fact templates, question phrasings, entities);
* ``facts.jsonl``: every fact with its full history, one dated version per line;
* ``traces.jsonl``: teacher traces in the OpenAI chat fine-tuning format.

The company (Fernhill Cloud) is invented. Its facts change often (the history holds many price
experiments), and every trace is answered with the version of the fact that was valid on the
trace's date. A student trained on these traces, with the facts *as of each trace's date* in its
prompt, cannot learn "Pro costs 49 EUR": the value it must say changes from trace to trace. It
learns to copy the value from the fact it is shown, which is what lets the demo change a price in
the store and see the student's answer change without retraining.

The "teacher" answers here are produced by this script (the answer is the fact's sentence), not by
an LLM: every trace says so in ``metadata.generated_by``. Deterministic: same seed, same files.

Usage:
    .venv/bin/python bench/make_demo_traces.py [--traces 1600] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "plugin" / "demo_data"
GENERATOR = "bench/make_demo_traces.py"
TEACHER = "stand-in-teacher"

COMPANY = "Fernhill Cloud"
PLANS = ["Starter", "Pro", "Team", "Business"]

#: attribute -> fact template, question phrasings, current value per plan, history range per plan
PLAN_ATTRIBUTES: dict[str, dict[str, Any]] = {
    "price": {
        "fact": "The {plan} plan costs {v} EUR a month.",
        "unit": "EUR",
        "words": ["price", "cost", "pay", "expensive", "much is", "fee", "eur"],
        "questions": [
            "How much does the {plan} plan cost?",
            "What is the price of the {plan} plan?",
            "What does {plan} cost per month?",
            "How much is the {plan} plan?",
            "What's the monthly price of the {plan} plan?",
            "How expensive is the {plan} plan?",
            "What do I pay for {plan} each month?",
            "What is the {plan} plan's monthly fee?",
        ],
        "current": {"Starter": 19, "Pro": 49, "Team": 99, "Business": 199},
        "range": {"Starter": (5, 39), "Pro": (25, 89), "Team": (60, 179), "Business": (120, 399)},
    },
    "storage": {
        "fact": "The {plan} plan includes {v} GB of storage.",
        "unit": "GB",
        "words": ["storage", "gb", "space", "disk"],
        "questions": [
            "How much storage does the {plan} plan include?",
            "How many GB do I get on {plan}?",
            "What is the storage limit of the {plan} plan?",
            "How much space comes with the {plan} plan?",
            "How much disk space does {plan} have?",
        ],
        "current": {"Starter": 20, "Pro": 200, "Team": 1000, "Business": 5000},
        "range": {
            "Starter": (5, 50),
            "Pro": (50, 500),
            "Team": (250, 2000),
            "Business": (1000, 9000),
        },
    },
    "seats": {
        "fact": "The {plan} plan includes {v} user seats.",
        "unit": "users",
        "words": ["users", "seats", "people", "members", "user limit"],
        "questions": [
            "How many users can the {plan} plan have?",
            "How many seats does {plan} include?",
            "How many users does the {plan} plan allow?",
            "How many people can use a {plan} account?",
            "How many user seats come with the {plan} plan?",
        ],
        "current": {"Starter": 3, "Pro": 10, "Team": 50, "Business": 250},
        "range": {"Starter": (1, 5), "Pro": (5, 25), "Team": (20, 100), "Business": (100, 500)},
    },
}

#: key -> fact template, question phrasings, current value, history range
POLICIES: dict[str, dict[str, Any]] = {
    "policy.refund": {
        "fact": "Refunds are available within {v} days of purchase.",
        "unit": "days",
        "words": ["refund", "money back"],
        "questions": [
            "What is the refund policy?",
            "How long do I have to ask for a refund?",
            "How many days is the refund window?",
            "Until when can I get my money back?",
        ],
        "current": 30,
        "range": (7, 60),
    },
    "policy.trial": {
        "fact": "The free trial lasts {v} days.",
        "unit": "days",
        "words": ["trial", "try it"],
        "questions": [
            "How long is the free trial?",
            "How many days is the trial?",
            "How long can I try it for free?",
            "What is the length of the free trial?",
        ],
        "current": 14,
        "range": (7, 45),
    },
    "policy.support": {
        "fact": "Support replies within {v} hours on business days.",
        "unit": "hours",
        "words": ["support", "reply", "response time"],
        "questions": [
            "How fast does support reply?",
            "What is the support response time?",
            "How long until support answers a ticket?",
            "When will support get back to me?",
        ],
        "current": 8,
        "range": (2, 48),
    },
    "limit.api": {
        "fact": "The API allows {v} requests per minute.",
        "unit": "requests per minute",
        "words": ["api", "rate limit", "requests"],
        "questions": [
            "What is the API rate limit?",
            "How many API requests can I make per minute?",
            "How many calls per minute does the API allow?",
            "What is the request limit of the API?",
        ],
        "current": 600,
        "range": (60, 1200),
    },
    "limit.upload": {
        "fact": "The largest file you can upload is {v} MB.",
        "unit": "MB",
        "words": ["upload", "file size", "largest file"],
        "questions": [
            "What is the maximum upload size?",
            "How big can an uploaded file be?",
            "What is the file size limit for uploads?",
            "What is the largest file I can upload?",
        ],
        "current": 250,
        "range": (10, 900),
    },
    "policy.annual": {
        "fact": "Annual billing saves {v} percent.",
        "unit": "percent",
        "words": ["annual", "yearly", "discount"],
        "questions": [
            "How much do I save with annual billing?",
            "What discount do I get for paying yearly?",
            "Is annual billing cheaper, and by how much?",
            "What is the discount for yearly billing?",
        ],
        "current": 15,
        "range": (5, 40),
    },
}

PREFIXES = ["", "", "", "Hi! ", "Hello, ", "Quick question: ", "Hey, ", "Good morning. ", "Sorry, "]
SUFFIXES = ["", "", "", " Thanks!", " Thank you.", " Please tell me.", " I need it for a quote."]

HISTORY_START = datetime(2020, 1, 1, tzinfo=UTC)
HISTORY_END = datetime(2025, 12, 1, tzinfo=UTC)
#: The price the demo raises ``price.pro`` to (step 4), and other values traces must show.
DEMO_NEW_PRICE = 59
MUST_SEE: dict[str, tuple[int, ...]] = {"price.pro": (DEMO_NEW_PRICE,)}
#: The current version of every fact: the demo's "today" starts from these values.
CURRENT_AS_OF = datetime(2026, 1, 1, tzinfo=UTC)

#: The scripted demo: single questions, multi-turn conversations and out-of-scope requests.
#: ``expect`` is the key whose current value a correct answer states (``None``: out of scope).
QUESTIONS: list[dict[str, Any]] = [
    {"turns": ["How much does the Pro plan cost?"], "expect": "price.pro"},
    {"turns": ["What is the price of the Team plan?"], "expect": "price.team"},
    {"turns": ["How much storage does the Business plan include?"], "expect": "storage.business"},
    {"turns": ["How many users can the Starter plan have?"], "expect": "seats.starter"},
    {"turns": ["How long is the free trial?"], "expect": "policy.trial"},
    {"turns": ["What is the refund policy?"], "expect": "policy.refund"},
    {"turns": ["What is the API rate limit?"], "expect": "limit.api"},
    {"turns": ["Hi! What is the maximum upload size? Thanks!"], "expect": "limit.upload"},
    {"turns": ["How fast does support reply?"], "expect": "policy.support"},
    {"turns": ["How much do I save with annual billing?"], "expect": "policy.annual"},
    {
        "turns": ["How much does the Pro plan cost?", "And what about the Team plan?"],
        "expect": "price.team",
    },
    {
        "turns": ["How much storage does the Pro plan include?", "Same question for Business."],
        "expect": "storage.business",
    },
    {"turns": ["Write a short poem about the sea."], "expect": None},
    {"turns": ["Can you help me debug a segfault in my C++ code?"], "expect": None},
]


def fact_keys() -> list[str]:
    """Every fact key, plan facts first."""
    keys = [f"{attr}.{plan.lower()}" for attr in PLAN_ATTRIBUTES for plan in PLANS]
    return keys + list(POLICIES)


def spec(key: str) -> dict[str, Any]:
    """Template, phrasings, current value and history range of one key."""
    if key in POLICIES:
        p = POLICIES[key]
        return {**p, "plan": None}
    attr, plan_l = key.split(".")
    plan = next(p for p in PLANS if p.lower() == plan_l)
    a = PLAN_ATTRIBUTES[attr]
    return {
        "fact": a["fact"].replace("{plan}", plan),
        "unit": a["unit"],
        "words": a["words"],
        "questions": [q.replace("{plan}", plan) for q in a["questions"]],
        "current": a["current"][plan],
        "range": a["range"][plan],
        "plan": plan,
    }


def _round_values(lo: int, hi: int, price: bool) -> list[int]:
    """Round values in ``[lo, hi]``: one significant digit (5, 60, 200, 5000), quarter steps
    (25, 250, 750, 2500) and, for prices, anything ending in 9 (49, 99, 199)."""

    def round_(v: int) -> bool:
        step = 10 ** (len(str(v)) - 1)
        if v % step == 0 or (v >= 25 and v % (25 * step // 10) == 0 and len(str(v)) >= 2):
            return True
        return price and v % 10 == 9

    return [v for v in range(lo, hi + 1) if round_(v)]


def history(
    key: str, rng: random.Random, versions: int, must: Sequence[int] = ()
) -> list[tuple[datetime, int]]:
    """``versions`` dated values of one fact, oldest first; the last is the current value.

    Most historical values are round (49, 250, 5000, like the current ones) and the rest are drawn
    uniformly. The current value, and any value in ``must``, also held at some earlier time, so the
    traces show the student those numbers (a student tokenizer trained on the traces then has
    them as tokens) while the value it must say still changes from trace to trace.
    """
    s = spec(key)
    lo, hi = s["range"]
    rounds = _round_values(lo, hi, price=key.startswith("price."))
    span = (HISTORY_END - HISTORY_START).days
    days = sorted(rng.sample(range(1, span), versions - 2))
    dates = [HISTORY_START] + [HISTORY_START + timedelta(days=d) for d in days]
    forced = dict(
        zip(rng.sample(range(len(dates) - 1), len(must) + 1), [s["current"], *must], strict=True)
    )
    values: list[int] = []
    for i in range(len(dates)):
        if i in forced:
            values.append(forced[i])
            continue
        draw = (lambda: rng.choice(rounds)) if rng.random() < 0.6 else (lambda: rng.randint(lo, hi))
        v = draw()
        while v == s["current"] or (values and v == values[-1]):
            v = draw()
        values.append(v)
    for i in range(1, len(values)):  # no two consecutive versions with the same value
        if values[i] == values[i - 1]:
            values[i] = lo if values[i] != lo else hi
    return [*zip(dates, values, strict=True), (CURRENT_AS_OF, s["current"])]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--traces", type=int, default=1600)
    ap.add_argument("--versions", type=int, default=24, help="dated versions per fact")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    keys = fact_keys()
    histories = {k: history(k, rng, args.versions, MUST_SEE.get(k, ())) for k in keys}
    company = {
        "company": COMPANY,
        "generated_by": GENERATOR,
        "plans": PLANS,
        "facts": {
            k: {
                "fact": spec(k)["fact"],
                "unit": spec(k)["unit"],
                "plan": spec(k)["plan"],
                "words": spec(k)["words"],
                "questions": spec(k)["questions"],
            }
            for k in keys
        },
        "questions": QUESTIONS,
        "price_change": {"key": "price.pro", "value": DEMO_NEW_PRICE},
    }
    (args.out / "company.json").write_text(json.dumps(company, indent=1) + "\n", encoding="utf-8")

    with open(args.out / "facts.jsonl", "w", encoding="utf-8") as f:
        for k in keys:
            for when, v in histories[k]:
                row = {
                    "key": k,
                    "as_of": when.date().isoformat(),
                    "text": spec(k)["fact"].format(v=v),
                    "value": v,
                }
                f.write(json.dumps(row) + "\n")

    # Every version of every fact (but the current one) is asked about at least once, then
    # versions are drawn at random; a trace's date falls inside its version's validity.
    intervals = [(k, i) for k in keys for i in range(len(histories[k]) - 1)]
    plan = intervals + [rng.choice(intervals) for _ in range(max(0, args.traces - len(intervals)))]
    rng.shuffle(plan)
    seen: set[str] = set()
    n = 0
    with open(args.out / "traces.jsonl", "w", encoding="utf-8") as f:
        for k, i in plan[: args.traces]:
            s = spec(k)
            q = rng.choice(PREFIXES) + rng.choice(s["questions"]) + rng.choice(SUFFIXES)
            while q in seen:  # the same question twice would be deduplicated by the job anyway
                q = rng.choice(PREFIXES) + rng.choice(s["questions"]) + rng.choice(SUFFIXES)
            seen.add(q)
            start, value = histories[k][i]
            end = histories[k][i + 1][0]
            when = start + timedelta(seconds=rng.uniform(0, (end - start).total_seconds() - 1))
            answer = s["fact"].format(v=value)
            obj = {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": answer},
                ],
                "metadata": {
                    "model": TEACHER,
                    "created_at": when.isoformat(timespec="seconds"),
                    "generated_by": GENERATOR,
                    "fact_key": k,
                },
            }
            f.write(json.dumps(obj) + "\n")
            n += 1
    print(
        f"wrote {len(keys)} facts ({sum(map(len, histories.values()))} versions), {n} traces "
        f"to {args.out}"
    )


if __name__ == "__main__":
    main()
