"""One registry of environment switches (pyturbo.settings): nothing else reads them, each value is validated there,
and the README's table is the registry's."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyturbo import settings

ROOT = Path(__file__).resolve().parents[1]
READS = re.compile(r"os\.environ\.get\(|os\.environ\[|os\.getenv\(|\benviron\.get\(|getenv\(")


def test_only_the_registry_reads_the_environment():
    """Python: no module but settings.py reads a variable (copying the environment for a child process, or setting
    one, is not reading a switch); C: only turbo_switch() (the executor's diagnostics), so the registry lists them."""
    offenders = []
    for path in sorted((ROOT / "src" / "pyturbo").rglob("*.py")):
        if path.name == "settings.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if READS.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    for folder in ("src/capi", "src/llama-turbo", "src/rpc-auth"):
        for path in sorted((ROOT / folder).glob("*.[ch]*")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "getenv(" in line and "return getenv(name)" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert settings.markdown_table() in readme, "regenerate it with: python -m pyturbo.settings"


@pytest.mark.parametrize("name,raw,message", [
    ("PYTURBO_PIPELINE", "on", "PYTURBO_PIPELINE must be one of 'auto', 'force', 'off'"),
    ("PYTURBO_GPU_STREAMS", "0", "PYTURBO_GPU_STREAMS must be 'auto' or a count >= 1"),
    ("PYTURBO_PIPELINE_HOST_STAGING", "maybe", "PYTURBO_PIPELINE_HOST_STAGING must be 0 or 1"),
    ("PYTURBO_RPC_TOKEN", "a\0b", "PYTURBO_RPC_TOKEN must not contain NUL")])
def test_a_bad_value_names_the_switch_and_what_it_takes(name, raw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        settings.read(name, {name: raw})


def test_values_and_defaults(tmp_path):
    assert settings.read("PYTURBO_PIPELINE", {}) == "auto"
    assert settings.read("PYTURBO_PIPELINE", {"PYTURBO_PIPELINE": " Force "}) == "force"
    assert settings.read("PYTURBO_GPU_STREAMS", {"PYTURBO_GPU_STREAMS": "2"}) == 2
    assert settings.read("PYTURBO_PIPELINE_HOST_STAGING", {"PYTURBO_PIPELINE_HOST_STAGING": "1"}) is True
    assert settings.read("PYTURBO_CALIBRATION", {"PYTURBO_CALIBRATION": "off"}) is None
    assert settings.read("PYTURBO_CALIBRATION", {"PYTURBO_CALIBRATION": str(tmp_path / "c.json")}) == tmp_path / "c.json"
    assert settings.read("PYTURBO_CALIBRATION", {}).name == "calibration.json"
    assert not settings.is_set("GGML_CUDA_DEVICES", {}) and settings.is_set("GGML_CUDA_DEVICES", {"GGML_CUDA_DEVICES": ""})
    with pytest.raises(KeyError, match="not read by the Python library"):
        settings.read("LLAMA_TURBO_TRACE", {})
