import subprocess
import sys


def test_import_difftool_loads_no_heavy_backend() -> None:
    code = (
        "import sys, difftool, difftool.cli;"
        "print(','.join(m for m in ('torch','diffusers','onnx','onnxruntime','tensorrt','PySide6','ray')"
        " if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_offline_by_default() -> None:
    code = "import os; os.environ.pop('HF_HUB_OFFLINE', None); import difftool; print(os.environ['HF_HUB_OFFLINE'])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "1"
