"""Engagement campaigns: audiences, templates, experiments (variants, pilots, control groups), fan-out, events, KPI reports.

Everything here feeds the delivery core through its front door (`StreamQueue.enqueue` with the
`campaign` and `variant` fields set), so a campaign message obeys the same policy (opt-outs,
send windows, caps) and the same guarantees as any other message.
"""
