"""Every part of the TensorRT Python API sdrt touches exists in TensorRT 10 (the stubs) and in
TensorRT 11 (the real 11.4 bindings), except what `tensorrt_api.VERSION_SPECIFIC` declares."""

from __future__ import annotations

from tensorrt_api import (
    BUILDER_FLAGS_REMOVED_IN_11,
    HIDDEN_BY_LONGER_NAMES,
    NOT_TENSORRT,
    VERSION_SPECIFIC,
    in_trt10,
    in_trt11,
    in_trt11_path,
    stub_api,
    used_member_names,
    used_module_paths,
)

BOTH = ("10", "11")


def test_the_extractor_finds_the_module_paths_builder_and_runtime_use() -> None:
    paths = used_module_paths()
    expected = {"Runtime", "OnnxParser", "Logger.WARNING", "TensorIOMode.INPUT"}
    expected.add("NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    assert expected <= paths
    assert {"execute_async_v3", "set_tensor_address", "create_network"} <= used_member_names()


def test_every_module_path_sdrt_uses_exists_in_the_versions_it_is_declared_for() -> None:
    wrong = []
    for path in sorted(used_module_paths()):
        versions = VERSION_SPECIFIC.get(path, BOTH)
        found = {"10": in_trt10(path), "11": in_trt11_path(path)}
        wrong += [
            f"trt.{path}: {'present' if there else 'missing'} in TensorRT {v}, declared "
            f"for {', '.join(versions)}"
            for v, there in found.items()
            if there != (v in versions)
        ]
    assert not wrong, "\n".join(wrong)


def test_every_tensorrt_member_sdrt_calls_exists_in_tensorrt_11() -> None:
    exempt = set(NOT_TENSORRT) | {path.rsplit(".", 1)[-1] for path in VERSION_SPECIFIC}
    missing = sorted(n for n in used_member_names() - exempt if not in_trt11(n))
    assert not missing, f"not in the TensorRT 11.4 bindings: {missing}"


def test_the_version_table_names_only_paths_sdrt_uses() -> None:
    assert set(VERSION_SPECIFIC) <= used_module_paths()
    assert not any(in_trt11(name) for name in NOT_TENSORRT)  # else the exemption is not needed


def test_the_builder_flags_the_tensorrt_11_fake_drops_are_those_tensorrt_11_dropped() -> None:
    classes, _ = stub_api()
    flags = {m for m in classes["BuilderFlag"] if m.isupper()}
    assert flags >= BUILDER_FLAGS_REMOVED_IN_11
    missing_in_11 = {flag for flag in flags if not in_trt11(flag)}
    assert missing_in_11 == BUILDER_FLAGS_REMOVED_IN_11 - HIDDEN_BY_LONGER_NAMES
