"""benchmarks/method_memory.py: the table of added memory per method, on made-up rows."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "method_memory.py"
spec = importlib.util.spec_from_file_location("method_memory", SCRIPT)
method_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(method_memory)


def _row(method, added_mb, trained, estimate_mb=None):
    return {"method": method, "status": "ok", "added_mb": added_mb, "loaded_mb": 700.0, "trained_params": trained,
            "estimate_mb": estimate_mb, "losses": [1.2, 0.7], "seconds_per_step": 0.5}


def test_table_gives_each_methods_added_memory_relative_to_lora():
    rows = [_row("lora", 80.0, 380_000, 91.0), _row("finetune", 540.0, 25_790_000),
            {"method": "loha", "status": "error", "error": "Traceback ... MemoryError"}]
    lines = method_memory.table(rows).splitlines()
    assert lines[0].split()[:3] == ["method", "trained", "added"]
    assert lines[1].split() == ["lora", "0.38", "M", "80", "MiB", "1.00", "91", "MiB", "1.200->0.700", "0.50"]
    assert lines[2].split()[:7] == ["finetune", "25.79", "M", "540", "MiB", "6.75", "-"]
    assert lines[3].split() == ["loha", "error"]
    assert "MemoryError" in method_memory.one_line(rows[2])


def test_table_without_a_lora_row_has_no_ratio():
    assert method_memory.table([_row("dora", 117.0, 400_000)]).splitlines()[1].split()[5] == "-"


def test_an_unknown_method_is_named_with_the_choices():
    with pytest.raises(SystemExit, match="unknown lorra; choose from lora, locon"):
        method_memory.main(["--methods", "lora,lorra"])
