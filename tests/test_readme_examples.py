"""The README's runnable examples run as written (those that build tiny models offline)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
          if "tiny_model_and_processor" in b]


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index])
    out = subprocess.run([sys.executable, "-P", str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"visual tokens (\d+) -> (\d+)", out.stdout)
    before, after = map(int, re.search(r"visual tokens (\d+) -> (\d+)", out.stdout).groups())
    assert after < before


def test_quickstart_script_runs():
    out = subprocess.run([sys.executable, "-P", str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "visual tokens 64 -> 16" in out.stdout


SHIPPED = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
           if "vc.models" in b and "tiny_model_and_processor" not in b]


def test_readme_has_shipped_model_examples():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("index", range(len(SHIPPED)))
def test_readme_shipped_model_example_runs(index, tmp_path):
    """The examples on the shipped task-trained models run as written (blocks after the first may use
    names the first defined, as a reader running them in order would)."""
    script = tmp_path / "example.py"
    script.write_text("\n".join(SHIPPED[:index + 1]) if index else SHIPPED[0])
    out = subprocess.run([sys.executable, "-P", str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
