"""Shared fixtures: one tiny random-weight model, saved as a diffusers folder and exported once
per test session through the real loading code."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def graph_cache_dir(tmp_path_factory):
    """Every load in the suite (servers the tests start included) keeps ONNX Runtime's
    optimized graphs in a temporary folder, never in the user's ~/.cache."""
    path = tmp_path_factory.mktemp("graph_cache")
    before = os.environ.get("SDRT_GRAPH_CACHE")
    os.environ["SDRT_GRAPH_CACHE"] = str(path)
    yield path
    if before is None:
        del os.environ["SDRT_GRAPH_CACHE"]
    else:
        os.environ["SDRT_GRAPH_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from sdrt.export.load import random_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny"
    random_pipeline("tiny", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """The eager diffusers pipeline, loaded back from the folder like a user's checkpoint."""
    from sdrt.export.load import load_pipeline

    return load_pipeline(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_pipe, tmp_path_factory):
    from sdrt.export.bundle_writer import export_bundle

    path = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_pipe, path, "sd1", progress=False)
    return path


@pytest.fixture(scope="session")
def preset_bundle(tmp_path_factory):
    """preset name -> (eager diffusers pipeline, exported bundle path), built once each."""
    from sdrt.export.bundle_writer import export_bundle
    from sdrt.export.load import random_pipeline
    from sdrt.export.presets import PRESETS

    cache = {}

    def build(preset):
        if preset not in cache:
            pipe = random_pipeline(preset, seed=0)
            path = tmp_path_factory.mktemp("bundles") / preset
            export_bundle(pipe, path, PRESETS[preset]["family"], progress=False)
            cache[preset] = (pipe, path)
        return cache[preset]

    return build
