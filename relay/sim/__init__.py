"""Emulated glasses and a bumble-backed bleak backend (the BLE test bed).

No Bluetooth hardware is needed: the glasses are a bumble ``Device`` with a
real GATT server on a virtual controller, the phone is a second bumble
``Device``, and both share one virtual radio
(../shared/design/BLE-TESTBED.md).

- :mod:`relay.sim.profiles`: link timing profiles and the glasses' GATT UUIDs.
- :mod:`relay.sim.shaped_link`: ``ShapedLink`` (connection events, air time,
  delayed HCI credits), ``make_link()``, ``AclCreditGate``.
- :mod:`relay.sim.controller_fixes`: ``FixedController`` (bumble 0.0.236
  controller fixes), ``FastHost``, ``HciTcpServer``.
- :mod:`relay.sim.peripheral`: ``GlassesPeripheral`` and the cross-process
  ``GlassesHciServer`` (``python -m relay.sim.peripheral``).
- :mod:`relay.sim.bleak_bumble`: ``BumbleAdapter``, ``BumbleBleakScanner``,
  ``BumbleBleakClient`` for ``BleakScanner/BleakClient(backend=...)``.

Nothing is re-exported here, so importing a light ``relay.sim`` module does
not load bumble and bleak.
"""
