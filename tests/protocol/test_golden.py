"""Golden vectors: every frame, record, message and body type, in hex."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from golden_cases import all_cases

GOLDEN = Path(__file__).parent.parent / "data" / "golden" / "protocol-v1.json"
VECTORS: dict[str, str] = json.loads(GOLDEN.read_text())
CASES = all_cases()


def test_every_case_has_a_vector_and_no_vector_is_stale() -> None:
    assert sorted(VECTORS) == sorted(c.name for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_encode_gives_the_golden_bytes(case) -> None:  # type: ignore[no-untyped-def]
    assert case.encode().hex() == VECTORS[case.name]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_bytes_decode_to_the_value(case) -> None:  # type: ignore[no-untyped-def]
    assert case.check(bytes.fromhex(VECTORS[case.name]))


def test_every_message_kind_has_a_golden_vector() -> None:
    from protocol.constants import MessageKind

    kinds = {
        int(bytes.fromhex(v)[0])
        for name, v in VECTORS.items()
        if name.startswith("message/")
    }
    assert kinds == {int(k) for k in MessageKind}
