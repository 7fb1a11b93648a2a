"""Learners' stored state: registered devices, preferences and attributes (Redis hashes per user)."""
