"""The fuzz invariant over 200,000 random and mutated inputs (make fuzz runs longer)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tools.fuzz import mutations, protocol_one_input

GOLDEN = Path(__file__).parent.parent / "data" / "golden" / "protocol-v1.json"
INPUTS = 200_000


def test_decoders_return_or_raise_remote_protocol_error_only() -> None:
    seeds = [bytes.fromhex(v) for v in json.loads(GOLDEN.read_text()).values()]
    rng = random.Random(20261128)
    started = time.perf_counter()
    fed = 0
    for data in mutations(seeds, INPUTS, rng):
        # Any other exception fails the test with the input in the traceback.
        protocol_one_input(data)
        fed += 1
    assert fed == INPUTS
    # Not a speed gate: a note for whoever reads the log.
    print(f"{fed} inputs in {time.perf_counter() - started:.1f} s")
