"""Per-request routing: the pure decision (:mod:`relay.router.decide`)."""
