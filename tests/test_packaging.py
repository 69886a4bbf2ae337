"""`kernels` and `adapters` are names of other PyPI projects: installing vlmcompress must not shadow them."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_no_top_level_kernels_or_adapters(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("vlmcompress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "adapters" not in tops, tops
    assert "vlmcompress/kernels/__init__.py" in names
    assert "vlmcompress/adapters/__init__.py" in names
    assert "vlmcompress/kernels/reference.py" in names


def test_installed_package_does_not_provide_top_level_modules(tmp_path):
    # Run outside the repository so the checkout's folders are not on sys.path.
    code = ("import importlib.util, vlmcompress.kernels, vlmcompress.adapters;"
            "print(importlib.util.find_spec('kernels'), importlib.util.find_spec('adapters'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "None None"


def test_core_import_is_light():
    code = "import sys, vlmcompress; print('transformers' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False False"


def test_every_public_name_resolves():
    import vlmcompress

    for name in vlmcompress.__all__:
        assert getattr(vlmcompress, name) is not None, name


def test_missing_extras_say_what_to_install():
    # sys.modules[name] = None makes `import name` raise ImportError, as if the extra were not installed.
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import vlmcompress as vc\n"
            "try:\n    vc.patch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'vlmcompress[hf]'" in out.stdout
    code = ("import sys; sys.modules['gradio'] = None\n"
            "from vlmcompress.demo.app import build_app\n"
            "try:\n    build_app()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'vlmcompress[demo]'" in out.stdout
