"""Per-request routing, pure: no I/O, no clock, no asyncio (docs/router.md).

- :mod:`relay.router.decide`: ``decide(request, snapshot, policy)``, the
  deadline-aware router (local, cloud, or cloud with a local hedge);
- :mod:`relay.router.estimators`: what the daemon learns from its traffic
  (BLE goodput, uplink round trip and throughput, radio idle time, the cloud's
  first-token time per kind), turned into a snapshot per request;
- :mod:`relay.router.strategies`: the router and the baselines it is measured
  against (``always_cloud``, ``always_local``).
"""
