"""Every Redis key the gateway uses, in one place, under one prefix (several gateways can share a Redis)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "pushgw"

    @property
    def stream(self) -> str:
        """The work stream of the normal lane: one entry per message (or per retried delivery)."""
        return f"{self.prefix}:stream"

    @property
    def stream_high(self) -> str:
        """The work stream of the high lane (priority "high"): workers serve it first."""
        return f"{self.prefix}:stream:high"

    def lane_stream(self, lane: str) -> str:
        return self.stream_high if lane == "high" else self.stream

    @property
    def group(self) -> str:
        """The consumer group every worker on every host joins."""
        return "workers"

    @property
    def delayed(self) -> str:
        """Sorted set of scheduled, deferred and retried messages by due time.

        Members are `attempt:enqueued_ms:lane:uid` (lane `h` or `n`: the stream they return to)."""
        return f"{self.prefix}:delayed"

    @property
    def delayed_data(self) -> str:
        """Hash member -> message JSON for the delayed set (kept apart so the set stays small)."""
        return f"{self.prefix}:delayed:data"

    @property
    def delayed_ids(self) -> str:
        """Hash message id -> its member in the delayed set, for the messages that are still waiting whole (scheduled
        or held by the policy): what `DELETE /v1/messages/{id}` looks up. Those members end in `#<message id>`."""
        return f"{self.prefix}:delayed:ids"

    def ref_ids(self, owner: str, ref: str) -> str:
        """Set of message ids an API client (`owner`) enqueued with this `ref`: `DELETE /v1/messages?ref=`. (`#` is in
        no ref; the cancel also checks each message's owner.)"""
        return f"{self.prefix}:ref:{owner}#{ref}"

    @property
    def dead(self) -> str:
        """Dead-letter stream: message, reason, attempts, provider."""
        return f"{self.prefix}:dead"

    @property
    def invalid_tokens(self) -> str:
        """Stream of invalid-token events that upstream services may read (and clean their own data)."""
        return f"{self.prefix}:events:invalid_tokens"

    # ------------------------------------------------------------------ message status and outcome events (queue/status.py)

    def status(self, message_id: str) -> str:
        """String of one message's status records: its `meta` (who enqueued it, when) and its timeline steps
        (queue/status.py)."""
        return f"{self.prefix}:ms:{message_id}"

    def user_messages(self, user: str, period: int) -> str:
        """String of the ids of a learner's messages accepted in one retention-long `period` (queue/status.py),
        one a line, oldest first."""
        return f"{self.prefix}:stu:{user}:{period}"

    @property
    def outcome_events(self) -> str:
        """Stream of final outcomes per delivery and policy drops (MAXLEN ~ status.events_maxlen)."""
        return f"{self.prefix}:events:outcomes"

    @property
    def webhook_dead(self) -> str:
        """Stream of webhook batches that failed `webhooks.max_attempts` times (`pushgw webhooks replay`)."""
        return f"{self.prefix}:webhooks:dead"

    @staticmethod
    def webhook_group(subscription: str) -> str:
        """The consumer group of one webhook subscription on the outcome event stream."""
        return f"webhook:{subscription}"

    def idem(self, message_id: str) -> str:
        """Marks a message id as accepted, for the idempotency window; its value is the API client that enqueued it
        (`x:<client>` once withdrawn), so a cancel can tell "sent" from "unknown"."""
        return f"{self.prefix}:idem:{message_id}"

    def done(self, ref: str) -> str:
        """Device keys of a stream entry (`Entry.ref`) whose delivery has settled (skipped if it is redelivered)."""
        return f"{self.prefix}:done:{ref}"

    @property
    def migrated(self) -> str:
        """Set of the source items (`<stream>/<entry id>`, `delayed/<member>`) `pushgw migrate` moved into this shard:
        a rerun skips them (gateway/migrate.py)."""
        return f"{self.prefix}:migrated"

    @property
    def live_workers(self) -> str:
        """Sorted set of worker processes' consumer names scored by when their lease ends (Redis Cluster: who
        reads which shards, gateway/shard_owner.py)."""
        return f"{self.prefix}:workers"

    def user(self, user: str) -> str:
        """Hash of a user's stored preferences: time zone, opt-outs (users/profiles.py)."""
        return f"{self.prefix}:user:{user}"

    def provider_rate(self, scope: str) -> str:
        """GCRA state (theoretical arrival time) of a provider-wide rate limit (ratelimit/provider_rate.py)."""
        return f"{self.prefix}:rate:{scope}"

    def client_rate(self, client: str) -> str:
        """GCRA state of an API client's `rate_per_s`, shared by every API process (gateway/api/auth.py)."""
        return f"{self.prefix}:rate:client:{client}"

    def devices(self, user: str) -> str:
        """Hash device key -> device JSON: the user's registered devices."""
        return f"{self.prefix}:devices:{user}"

    def cap(self, user: str, category: str) -> str:
        """Sorted set of message ids a category cap admitted for a user, scored by time (ratelimit/caps.py)."""
        return f"{self.prefix}:cap:{category}:{user}"

    def burst(self, user: str) -> str:
        """Sorted set of message ids the per-user burst limit admitted, scored by time."""
        return f"{self.prefix}:burst:{user}"

    # ------------------------------------------------------------------ campaigns (campaigns/*)

    def audience_index(self, attr: str, value: str) -> str:
        """Set of users whose attribute `attr` (cohort, track, skill, locale, topic) has `value`: audiences are
        SINTER/SUNION of these, so a filter over 100k learners is one Redis command, not a scan."""
        return f"{self.prefix}:aud:{attr}:{value}"

    def template(self, name: str) -> str:
        """JSON of a saved, validated template (campaigns/templates.py)."""
        return f"{self.prefix}:tpl:{name}"

    @property
    def templates(self) -> str:
        """Set of template names."""
        return f"{self.prefix}:tpls"

    def campaign(self, campaign: str) -> str:
        """JSON of a campaign definition (campaigns/experiments.py), plus its launched stage."""
        return f"{self.prefix}:cmp:{campaign}"

    @property
    def campaigns(self) -> str:
        """Set of campaign ids."""
        return f"{self.prefix}:cmps"

    def campaign_members(self, campaign: str) -> str:
        """The audience frozen at the first launch (SINTERSTORE): every stage and the control group come from it."""
        return f"{self.prefix}:cmp:{campaign}:members"

    def fanout(self, campaign: str) -> str:
        """Hash: the campaign's current fan-out job (state, stage, SSCAN cursor, progress counters)."""
        return f"{self.prefix}:cmp:{campaign}:fanout"

    def fanout_lease(self, campaign: str) -> str:
        """Who runs the fan-out job now (SET NX PX): a crashed runner's lease expires and another resumes."""
        return f"{self.prefix}:cmp:{campaign}:lease"

    @property
    def fanout_jobs(self) -> str:
        """Set of campaign ids whose fan-out job is not finished: what runners look at."""
        return f"{self.prefix}:fanout:jobs"

    def kpi(self, campaign: str) -> str:
        """Hash `<variant>:<figure>` -> count: assigned, sent, messages (fan-out) and event counts."""
        return f"{self.prefix}:cmp:{campaign}:kpi"

    def kpi_users(self, campaign: str, variant: str, outcome: str) -> str:
        """Set of users (or message ids) of a campaign/variant whose messages were delivered, failed or dropped:
        written in the worker's commit, so a retry, a second device or a redelivery is counted once. (`queued`: the
        learners an automation rule queued a message for, written by automations/engine.py.)"""
        return f"{self.prefix}:cmp:{campaign}:{outcome}:{variant}"

    def event_users(self, campaign: str, arm: str, kind: str) -> str:
        """Set of learners of a campaign's arm (variant or control) who reported an event of this kind: SADD's reply
        counts each (learner, kind) once; intersected with the `delivered` set for the per-delivered rates."""
        return f"{self.prefix}:cmp:{campaign}:evt:{kind}:{arm}"

    @staticmethod
    def upstream_campaign(label: str) -> str:
        """Where the figures of upstream messages labelled `label` are kept: apart from a stored campaign's own
        (`~` is in no campaign id or label), so a label cannot add to a stored campaign's report."""
        return f"~{label}"

    def campaign_variants(self, campaign: str) -> str:
        """Set of variant names the workers saw for a campaign (also for campaigns labelled by upstream messages)."""
        return f"{self.prefix}:cmp:{campaign}:variants"

    # ------------------------------------------------------------------ automations (automations/*)

    def automation(self, rule: str) -> str:
        """Hash of an automation rule: `def` (its JSON), `created_at`, `updated_at`."""
        return f"{self.prefix}:auto:{rule}"

    @property
    def automations(self) -> str:
        """Set of automation rule ids."""
        return f"{self.prefix}:autos"

    @property
    def automations_version(self) -> str:
        """Counter bumped by every rule change: API processes reload their rules when it moves (one GET a batch)."""
        return f"{self.prefix}:autos:version"

    def learning_event(self, client: str, event_id: str) -> str:
        """Marks a learning event id of an API client as handled (SET NX EX): a repeated event is a no-op."""
        return f"{self.prefix}:auto:evt:{client}#{event_id}"

    def automation_once(self, rule: str, user: str, entity: str) -> str:
        """Marks that a rule fired for a learner and entity (quiz, session, spell of inactivity): at most once. (`#` is in
        no user id or entity: two pairs never share a key.)"""
        return f"{self.prefix}:auto:once:{rule}#{user}#{entity}"

    @property
    def activity(self) -> str:
        """Sorted set learner -> last activity (unix s), written by every learning event: what inactivity rules
        range-query."""
        return f"{self.prefix}:auto:activity"

    def idle(self, rule: str) -> str:
        """An inactivity rule's cursor: the last activity time its sweeps have passed (automations/engine.py), so a
        learner is nudged once per spell and no tick scans everyone."""
        return f"{self.prefix}:auto:idle:{rule}"

    def opens(self, user: str) -> str:
        """Hash local hour (0-23) -> decayed count of a learner's opened events, and `t`: when it was last decayed."""
        return f"{self.prefix}:opens:{user}"

    def cohort_opens(self, cohort: str) -> str:
        """Hash local hour -> decayed count of opened events of a cohort (the fallback of a learner's best hour)."""
        return f"{self.prefix}:opens:cohort:{cohort}"
