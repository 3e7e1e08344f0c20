"""``import autopeft.data`` stays free of torch, nibabel and tqdm (``autopeft --help`` imports it);
its loaders still work."""

from __future__ import annotations

import subprocess
import sys


def test_the_package_imports_nothing_heavy_until_a_loader_is_used():
    code = (
        "import sys\n"
        "import autopeft.data as data\n"
        "heavy = [name for name in ('torch', 'nibabel', 'tqdm') if name in sys.modules]\n"
        "assert not heavy, f'import autopeft.data pulled in {heavy}'\n"
        "assert data.read_manifest and data.Protocol and data.resolve_manifest and data.simulate\n"
        "from autopeft.data import train_loader\n"
        "from autopeft.data.loading import train_loader as home\n"
        "assert train_loader is home and 'torch' in sys.modules\n"
        "assert set(data.__all__) <= set(dir(data))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
