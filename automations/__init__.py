"""Automations: learning events in, pushes out (rules, engine, inactivity sweep)."""
