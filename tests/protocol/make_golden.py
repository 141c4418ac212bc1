"""Write tests/data/golden/protocol-v1.json from golden_cases.py.

Run only for an intended wire-format change:
``python tests/protocol/make_golden.py``. test_golden.py then pins the bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from golden_cases import all_cases

OUT = Path(__file__).parent.parent / "data" / "golden" / "protocol-v1.json"


def main() -> None:
    vectors = {case.name: case.encode().hex() for case in all_cases()}
    OUT.write_text(json.dumps(vectors, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
