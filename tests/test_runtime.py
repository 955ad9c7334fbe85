"""The bottom-floor runtime switch and the registries that load their plugins by name."""

import os
import platform

import pytest

from cbir import runtime
from cbir.errors import CbirError
from cbir.registry import Registry


def test_the_switch_prefers_a_component_value_then_the_process_default(monkeypatch):
    monkeypatch.delenv("CBIR_RUNTIME", raising=False)
    assert runtime.resolve_runtime() == "torch"
    monkeypatch.setenv("CBIR_RUNTIME", "onnx")
    assert runtime.resolve_runtime() == "onnx" and runtime.resolve_runtime("torch") == "torch"
    with pytest.raises(CbirError, match="unknown runtime 'tf'"):
        runtime.resolve_runtime("tf")


def test_onnx_runners_register_by_name_without_the_lower_floors_importing_them():
    fn = runtime.runner("pooled")
    from cbir.export import runtime as export_runtime

    assert fn is export_runtime.pooled_extract
    assert {"pooled", "xfeat", "aliked", "disk", "lightglue", "loftr"} <= set(runtime._RUNNERS)
    with pytest.raises(CbirError, match="no onnxruntime implementation named 'nope'"):
        runtime.runner("nope")


def test_a_registry_imports_its_plugin_modules_on_first_lookup(tmp_path, monkeypatch):
    (tmp_path / "cbir_test_plugin_mod.py").write_text(
        "from cbir_test_registry_holder import REG\n@REG.register('tiny')\nclass Tiny: pass\n")
    (tmp_path / "cbir_test_registry_holder.py").write_text(
        "from cbir.registry import Registry\nREG = Registry('thing', plugins=['cbir_test_plugin_mod'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import cbir_test_registry_holder as holder

    assert holder.REG._items == {}  # nothing imported yet
    assert holder.REG.get("tiny").__name__ == "Tiny" and holder.REG.names() == ["tiny"]
    with pytest.raises(CbirError, match="unknown thing 'big'; choose one of: tiny"):
        holder.REG.get("big")
    assert Registry("empty").names() == []


def test_using_switches_the_process_default_for_a_block_and_puts_it_back(monkeypatch):
    monkeypatch.setenv("CBIR_RUNTIME", "onnx")
    runtime.set_default_runtime("torch")
    with runtime.using(None) as inside:
        assert inside == runtime.default_runtime() == "onnx"  # None: back to $CBIR_RUNTIME inside the block
    assert runtime.default_runtime() == "torch"
    with pytest.raises(ValueError, match="from the block"):
        with runtime.using(None):
            raise ValueError("from the block")
    assert runtime.default_runtime() == "torch"
    with pytest.raises(CbirError, match="unknown runtime 'tf'"):
        with runtime.using("tf"):
            pass  # pragma: no cover - refused before the block
    assert runtime.default_runtime() == "torch"
    runtime.set_default_runtime(None)
    assert runtime.default_runtime() == "onnx"


def _heap_kept(env_extra):
    import subprocess
    import sys

    from helpers import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("CBIR_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    code = "import cbir.runtime as r; a = r.keep_freed_memory(); print(a, r.keep_freed_memory() is a)"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **env_extra}, cwd=str(REPO), capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_kept_on_glibc_unless_the_user_tunes_malloc():
    assert _heap_kept({}) == ["True", "True"]  # once per process, the same answer after
    assert _heap_kept({"CBIR_MALLOC": "system"}) == ["False", "True"]
    assert _heap_kept({"MALLOC_MMAP_THRESHOLD_": "131072"}) == ["False", "True"]  # the user's own glibc tuning wins
