"""KPI report per campaign and variant, with 95% Wilson intervals and two-proportion z-tests; a PNG chart.

The unit is the learner (the unit of assignment): a learner with two devices, a retried delivery or
a frequency variant's second message is one learner reached, and an event is counted once per
learner and type. Figures:

- `assigned`: learners the fan-out put in the arm (the control group: learners held out);
- `sent`: learners with at least one message queued; `messages`: messages queued;
- `delivered`: learners with at least one delivery accepted by a provider; `failed`: learners with a
  failed delivery (dead letter, invalid token, no device) and none delivered; `dropped`: learners
  whose message the policy dropped (opt-out, cap, expiry) and nothing delivered or failed;
- `opened`, `converted`, `dismissed`, `opt_out`: learners of the arm who reported the event (app events,
  whether or not a push reached them: a learner with no device may still convert);
- `opened_delivered`, `converted_delivered`, `dismissed_delivered`, `opt_out_delivered`: those of them
  in the arm's `delivered` set (a Redis SINTERCARD), the numerators of the rates over `delivered`:
  CTR (opened), CR (converted), opt-out rate — so a rate can never exceed 1;
- `conversion_itt`: converted / assigned, for every arm including control ("intent to treat": the
  fair comparison with a group that got no push, since nobody in it could be "delivered"). While a
  fan-out is still counting its learners, events may outnumber `assigned`: the rate is then null.

Tests: every pair of variants on CTR, CR and opt-out rate; every variant against the control group
on conversion_itt. A two-sided two-proportion z-test with the pooled variance; p = erfc(|z|/√2).
No scipy: `math.erfc` is exact enough and keeps the dependency list short. matplotlib is optional
(the `test` extra) and imported only when a chart is drawn.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from ..queue.keys import Keys
from ..queue.shards import ShardMap
from .experiments import CONTROL
from .fanout import CampaignStore

Z95 = 1.959963984540054
ALPHA = 0.05
EVENT_FIGURES = ("opened", "converted", "dismissed", "opt_out")
RATES = (("ctr", "opened"), ("cr", "converted"), ("opt_out_rate", "opt_out"))


def _check(x: int, n: int) -> None:
    if x < 0 or x > n:
        raise ValueError(f"a proportion needs 0 <= successes <= n, got {x} of {n}")


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval: honest near 0 and 1 and with small n, where the normal interval is not.
    None when n == 0; ValueError when successes is outside [0, n]."""
    if n <= 0:
        return None
    _check(successes, n)
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At 0 of n the lower bound is exactly 0 and at n of n the upper bound exactly 1; center -/+ half
    # rounds a few ulps away from them (n = 3: 5.6e-17), which would put the rate outside its interval.
    lower = 0.0 if successes == 0 else max(0.0, center - half)
    upper = 1.0 if successes == n else min(1.0, center + half)
    return min(lower, p), max(upper, p)


def two_proportion(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float] | None:
    """(z, two-sided p) for H0: p1 == p2, pooled variance; None when a group is empty; ValueError when x > n."""
    if n1 <= 0 or n2 <= 0:
        return None
    _check(x1, n1)
    _check(x2, n2)
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (p1 - p2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def _rate(x: int, n: int) -> dict[str, Any]:
    if not 0 <= x <= n:  # figures still being counted (events before the fan-out committed): no rate yet
        return {"value": None, "ci95": None, "count": x, "of": n}
    ci = wilson(x, n)
    return {"value": (x / n) if n else None, "ci95": list(ci) if ci else None, "count": x, "of": n}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _figure_keys(keys: Keys, shards: ShardMap | None) -> list[Keys]:
    """Where the workers write a campaign's delivery figures: each shard's keys on Redis Cluster, else `keys`."""
    return shards.all_keys() if shards is not None and shards.clustered else [keys]


async def report_exists(redis: aioredis.Redis, keys: Keys, campaign: str, shards: ShardMap | None = None) -> bool:
    """A report exists for a stored campaign, or for any campaign label the workers have figures for."""
    if await CampaignStore(redis, keys).get(campaign) is not None:
        return True
    for k in _figure_keys(keys, shards):
        if await redis.exists(k.campaign_variants(k.upstream_campaign(campaign))):
            return True
    return False


async def _arm_figures(redis: aioredis.Redis, k: Keys, figures: str, arms: Sequence[str],
                       events: Keys | None, campaign: str) -> list[list[int]]:
    """Per arm: delivered, failed, failed and delivered, dropped, -, dropped and settled, -, then (with `events`, the
    keys of the event sets when they share `k`'s slot) each event figure among the delivered. One pipeline."""
    tmp = f"{k.prefix}:report:{uuid.uuid4().hex}"
    async with redis.pipeline(transaction=False) as pipe:
        for arm in arms:
            d, f, x = (k.kpi_users(figures, arm, o) for o in ("delivered", "failed", "dropped"))
            pipe.scard(d)
            pipe.scard(f)
            pipe.sintercard(2, [f, d])
            pipe.scard(x)
            pipe.execute_command("SUNIONSTORE", tmp, d, f)  # by name: the cluster pipeline refuses the helper
            pipe.sintercard(2, [x, tmp])
            pipe.delete(tmp)
            if events is not None:
                for fig in EVENT_FIGURES:
                    pipe.sintercard(2, [events.event_users(campaign, arm, fig), d])
        replies = await pipe.execute()
    per = 7 + (len(EVENT_FIGURES) if events is not None else 0)
    return [[int(r) for r in replies[per * i:per * i + per]] for i in range(len(arms))]


async def _events_among_delivered(redis: aioredis.Redis, keys: Keys, shards: ShardMap, campaign: str, figures: str,
                                  arm: str) -> list[int]:
    """Redis Cluster: each event figure's learners (kept with the campaign) who were delivered (on their shards)."""
    out: list[int] = []
    for fig in EVENT_FIGURES:
        by_shard: dict[int, list[str]] = {}
        for u in await redis.smembers(keys.event_users(campaign, arm, fig)):
            user = _s(u)
            by_shard.setdefault(shards.shard_of(user), []).append(user)
        n = 0
        for shard, users in by_shard.items():
            found = await redis.smismember(shards.keys(shard).kpi_users(figures, arm, "delivered"), users)
            n += sum(1 for x in found if x)
        out.append(n)
    return out


async def campaign_report(redis: aioredis.Redis, keys: Keys, campaign: str,
                          shards: ShardMap | None = None) -> dict[str, Any]:
    """The report as JSON (the API's, the CLI's and the chart's source).

    A stored campaign's figures are its own fan-out's only; a label that names no stored campaign reports the
    figures of the upstream messages labelled with it, kept apart (`Keys.upstream_campaign`). On Redis Cluster
    (`shards`) the workers' figures are per shard (disjoint learners) and summed; the definition, the fan-out's
    counters and the event sets are in `keys`, the home of global records."""
    stored = await CampaignStore(redis, keys).get(campaign)
    figures = campaign if stored is not None else keys.upstream_campaign(campaign)
    kpi = {_s(k): int(v) for k, v in (await redis.hgetall(keys.kpi(campaign))).items()} if stored else {}
    places = _figure_keys(keys, shards)
    seen = {_s(v) for k in places for v in await redis.smembers(k.campaign_variants(figures))}
    if stored is not None:
        arms = [v.name for v in stored.campaign.variants]
        if stored.campaign.control_percent > 0:
            arms.append(CONTROL)
    else:
        arms = sorted(seen | {f.split(":", 1)[0] for f in kpi})
    if shards is None or not shards.clustered:
        rows = await _arm_figures(redis, keys, figures, arms, keys, campaign)
    else:
        rows = [[0] * 7 for _ in arms]
        for k in places:
            for total, part in zip(rows, await _arm_figures(redis, k, figures, arms, None, campaign), strict=True):
                total[:] = [a + b for a, b in zip(total, part, strict=True)]
        for row, arm in zip(rows, arms, strict=True):
            row += await _events_among_delivered(redis, keys, shards, campaign, figures, arm)
    out_arms: list[dict[str, Any]] = []
    for arm, row in zip(arms, rows, strict=True):
        delivered, failed_all, failed_and_delivered, dropped_all, _, dropped_and_settled, _ = row[:7]
        a: dict[str, Any] = {"arm": arm, "control": arm == CONTROL}
        a["assigned"] = kpi.get(f"{arm}:assigned", 0)
        a["sent"] = kpi.get(f"{arm}:sent", 0)
        a["messages"] = kpi.get(f"{arm}:messages", 0)
        a["render_failed"] = kpi.get(f"{arm}:render_failed", 0)
        a["delivered"] = int(delivered)
        a["failed"] = int(failed_all) - int(failed_and_delivered)
        a["dropped"] = int(dropped_all) - int(dropped_and_settled)
        for j, fig in enumerate(EVENT_FIGURES):
            a[fig] = kpi.get(f"{arm}:{fig}", 0)
            a[f"{fig}_delivered"] = int(row[7 + j])
        for name, fig in RATES:
            a[name] = _rate(a[f"{fig}_delivered"], a["delivered"])
        a["conversion_itt"] = _rate(a["converted"], a["assigned"])
        out_arms.append(a)
    comparisons: list[dict[str, Any]] = []
    variants = [a for a in out_arms if not a["control"]]
    for i, a in enumerate(variants):
        for b in variants[i + 1:]:
            for name, _fig in RATES:
                comparisons.append(_compare(a, b, name))
    control = next((a for a in out_arms if a["control"]), None)
    if control is not None:
        for a in variants:
            comparisons.append(_compare(a, control, "conversion_itt"))
    return {"campaign": campaign, "stage_percent": stored.stage_percent if stored else None,
            "control_percent": stored.campaign.control_percent if stored else 0.0, "arms": out_arms,
            "comparisons": comparisons, "alpha": ALPHA, "method": "Wilson 95% intervals; two-sided two-proportion z-test"}


def _compare(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    ra, rb = a[metric], b[metric]
    out: dict[str, Any] = {"metric": metric, "a": a["arm"], "b": b["arm"]}
    test = None if ra["value"] is None or rb["value"] is None else two_proportion(ra["count"], ra["of"], rb["count"], rb["of"])
    if test is None:
        return out | {"difference": None, "z": None, "p_value": None, "significant": False}
    z, p = test
    return out | {"difference": ra["value"] - rb["value"], "z": z, "p_value": p, "significant": p < ALPHA}


def _pct(r: dict[str, Any]) -> str:
    if r["value"] is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{100 * r['value']:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}]"


def format_report(report: dict[str, Any]) -> str:
    """A fixed-width table for the terminal (`pushgw campaigns report`)."""
    lines = [f"campaign {report['campaign']}  stage {report['stage_percent']}%  control {report['control_percent']}%"]
    head = ("arm", "assigned", "sent", "delivered", "failed", "dropped", "opened", "converted", "opt_out",
            "CTR [95% CI]", "CR [95% CI]", "opt-out rate", "CR(ITT)")
    rows = [head]
    for a in report["arms"]:
        rows.append((a["arm"], *(str(a[k]) for k in ("assigned", "sent", "delivered", "failed", "dropped", "opened",
                                                   "converted", "opt_out")),
                     _pct(a["ctr"]), _pct(a["cr"]), _pct(a["opt_out_rate"]), _pct(a["conversion_itt"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if report["comparisons"]:
        lines.append("")
        for c in report["comparisons"]:
            if c["p_value"] is None:
                lines.append(f"{c['metric']}: {c['a']} vs {c['b']}: not enough data")
                continue
            verdict = "significant" if c["significant"] else "not significant"
            p = "p<0.0001" if c["p_value"] < 0.0001 else f"p={c['p_value']:.4f}"
            lines.append(f"{c['metric']}: {c['a']} vs {c['b']}: {100 * c['difference']:+.2f} points, z={c['z']:.2f}, "
                         f"{p} ({verdict} at {report['alpha']})")
    return "\n".join(lines) + "\n"


class ChartUnavailable(RuntimeError):
    """matplotlib is an optional dependency (the `test` extra has it)."""


def chart_png(report: dict[str, Any], metrics: Sequence[str] = ("ctr", "cr", "opt_out_rate", "conversion_itt")) -> bytes:
    """Grouped bars per arm with 95% Wilson intervals as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ChartUnavailable("the chart needs matplotlib: pip install matplotlib (or install pushgw[test])") from e
    arms = report["arms"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(metrics) * max(1, len(arms)) / 2), 4.2))
    width = 0.8 / max(1, len(arms))
    labels = {"ctr": "CTR (opened)", "cr": "CR (converted)", "opt_out_rate": "opt-out rate", "conversion_itt": "CR (ITT)"}
    for j, a in enumerate(arms):
        xs, ys, lo, hi = [], [], [], []
        for i, m in enumerate(metrics):
            r = a[m]
            if r["value"] is None:
                continue
            xs.append(i + (j - (len(arms) - 1) / 2) * width)
            ys.append(100 * r["value"])
            lo.append(max(0.0, 100 * (r["value"] - r["ci95"][0])))  # matplotlib refuses a negative error bar
            hi.append(max(0.0, 100 * (r["ci95"][1] - r["value"])))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{a['arm']} (n={a['delivered'] or a['assigned']})")
    ax.set_xticks(range(len(metrics)), [labels.get(m, m) for m in metrics])
    ax.set_ylabel("% of learners (95% Wilson interval)")
    ax.set_title(f"campaign {report['campaign']} — stage {report['stage_percent']}%")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
