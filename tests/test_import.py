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


def test_listing_commands_do_not_load_torch() -> None:
    code = (
        "import sys\nfrom difftool.cli import main\n"
        "for args in (['tasks'], ['schedulers'], ['plugins']):\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        assert not e.code\n"
        "print('LOADED', [m for m in ('torch', 'diffusers', 'onnxruntime') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out
