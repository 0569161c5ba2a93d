"""Benchmark records name the CPU: vendor, family, model, stepping and the core generation, read
from ``/proc/cpuinfo`` (a hypervisor shows Zen 3 and Zen 4 EPYCs both as "AMD EPYC")."""

from benchmarks.common import cpu_id

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
"""


def test_cpu_id_reads_the_first_processor_and_names_the_core(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN3)
    assert cpu_id(str(path)) == {"vendor": "AuthenticAMD", "family": 25, "model": 1, "stepping": 1,
                                 "core": "Zen 3 (Milan)"}


def test_cpu_id_of_an_unknown_model_has_no_core(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN3.replace("model\t\t: 1\n", "model\t\t: 99\n", 1))
    got = cpu_id(str(path))
    assert got["model"] == 99 and "core" not in got


def test_cpu_id_without_cpuinfo_is_empty(tmp_path):
    assert cpu_id(str(tmp_path / "missing")) == {}
