"""Per-user rate limits and delivery policy, evaluated once per batch read (see `base.Limiter`)."""
