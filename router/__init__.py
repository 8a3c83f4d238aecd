"""Routing between the local student and the teacher.

* :class:`ChatUnderstudy`: a LangChain chat model that answers with the student when it can and
  escalates hard, multi-turn, out-of-distribution or low-confidence requests to the teacher.
* :class:`Router` (transparent, calibrated) and :class:`LearnedRouter` (logistic regression): turn
  routing signals (:mod:`~langchain_understudy.router.signals`) into an escalation score and
  compare it with a calibrated threshold; :class:`TeacherRateController` steers that threshold
  online so the teacher-call rate holds its target when traffic shifts.
* :class:`ResilientTeacher`, :func:`teacher_from_settings`, :class:`PrivacyPolicy`: a guarded
  teacher (timeout, retries, circuit breaker, budget) and the rules that keep private conversations
  on the machine.
* :func:`evaluate_router`: quality vs teacher-call rate, APGR, CPT, per-signal AUROC, overhead.

Example:
    >>> from langchain_understudy.router import ChatUnderstudy, Router
    >>> router = Router(threshold=0.4)
    >>> router.threshold
    0.4
"""

from langchain_understudy.router.chat_models import ChatUnderstudy, Inspection
from langchain_understudy.router.evaluation import (
    RouterReport,
    apgr,
    auroc,
    collect_examples,
    cpt,
    evaluate_router,
    plot_report,
    quality_curve,
)
from langchain_understudy.router.policy import (
    Decision,
    LearnedRouter,
    RoutedExample,
    Router,
    TeacherRateController,
    load_router,
)
from langchain_understudy.router.signals import (
    DEFAULT_SIGNALS,
    OODIndex,
    RoutingContext,
    RoutingRules,
    SignalAbsent,
    SignalSpec,
)
from langchain_understudy.router.teachers import (
    PrivacyPolicy,
    ResilientTeacher,
    teacher_from_settings,
)

__all__ = [
    "DEFAULT_SIGNALS",
    "ChatUnderstudy",
    "Decision",
    "Inspection",
    "LearnedRouter",
    "OODIndex",
    "PrivacyPolicy",
    "ResilientTeacher",
    "RoutedExample",
    "Router",
    "RouterReport",
    "RoutingContext",
    "RoutingRules",
    "SignalAbsent",
    "SignalSpec",
    "TeacherRateController",
    "apgr",
    "auroc",
    "collect_examples",
    "cpt",
    "evaluate_router",
    "load_router",
    "plot_report",
    "quality_curve",
    "teacher_from_settings",
]
