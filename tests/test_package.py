"""The package imports on its own, from any working directory."""

import subprocess
import sys


def test_import_dcnlab_alone_in_a_fresh_interpreter(tmp_path):
    code = "import dcnlab; print(dcnlab.ops.deform_conv.__name__, dcnlab.nn.DeformConv2d.__name__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["deform_conv", "DeformConv2d"]
