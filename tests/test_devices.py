"""Device names are read once, the same way for every backend."""

import pytest

from sdrt import UserError
from sdrt.backends.base import Device, parse_device


@pytest.mark.parametrize(
    "name, expected",
    [
        ("auto", Device("auto", 0)),
        ("cpu", Device("cpu", 0)),
        ("cuda", Device("cuda", 0)),
        ("cuda:0", Device("cuda", 0)),
        ("cuda:3", Device("cuda", 3)),
    ],
)
def test_device_names_parse_to_kind_and_index(name, expected):
    assert parse_device(name) == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "", "cuda:1:2"])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(UserError, match="unknown device"):
        parse_device(name)
