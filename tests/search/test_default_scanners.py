"""The scanners a search uses when none are named: the data's own (search.config.default_scanners)."""

from __future__ import annotations

import pandas as pd
import pytest

from autopeft.errors import DataError
from autopeft.search.config import default_scanners


def test_default_scanners_follow_the_data():
    rows = [{"subject": f"s{i}", "scanner": name, "short": "x", "long": "y"}
            for name, n in (("Biograph mCT", 5), ("HRRT", 7), ("Gemini", 3)) for i in range(n)]
    frame = pd.DataFrame(rows)
    assert default_scanners(frame, gpu=True)[0] == ["Biograph mCT", "Gemini", "HRRT"]
    chosen, why = default_scanners(frame, gpu=False)
    assert chosen == ["Biograph mCT", "HRRT"] and "most subjects" in why and "HRRT (7 subjects)" in why
    assert default_scanners(frame, gpu=False, include="Gemini")[0] == ["Gemini", "HRRT"]
    with pytest.raises(DataError, match="'ECAT' is not in"):
        default_scanners(frame, gpu=False, include="ECAT")
