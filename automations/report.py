"""The report of an automation rule: its campaign report (`auto-<id>`: arms, Wilson intervals, tests) with the
funnel in front, summed over the arms, in learners: triggered (learners who set the rule off; `triggers` counts
every (learner, entity) firing) -> sent (a message queued) -> delivered -> opened -> converted."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from ..campaigns.report import campaign_report, format_report
from ..queue.keys import Keys
from .rules import PREFIX

FUNNEL = ("triggered", "sent", "delivered", "opened", "converted")


async def automation_report(redis: aioredis.Redis, keys: Keys, rule_id: str) -> dict[str, Any]:
    report = await campaign_report(redis, keys, f"{PREFIX}{rule_id}")
    kpi = {(k.decode() if isinstance(k, bytes) else k): int(v)
           for k, v in (await redis.hgetall(keys.kpi(f"{PREFIX}{rule_id}"))).items()}
    funnel = dict.fromkeys(FUNNEL, 0)
    triggers = 0
    for arm in report["arms"]:
        arm["triggers"] = kpi.get(f"{arm['arm']}:triggered", 0)
        triggers += arm["triggers"]
        funnel["triggered"] += arm["assigned"]  # learners: the member set counts each once
        for step in FUNNEL[1:]:
            funnel[step] += arm[step]
    return {"automation": rule_id, "funnel": funnel, "triggers": triggers, **report}


def format_automation_report(report: dict[str, Any]) -> str:
    """The funnel on one line, then the campaign table (`pushgw automations report`)."""
    funnel = " -> ".join(f"{step} {report['funnel'][step]}" for step in FUNNEL)
    return f"automation {report['automation']}: {funnel} ({report['triggers']} firings)\n" + format_report(report)
