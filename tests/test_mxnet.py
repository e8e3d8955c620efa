"""The pure-Python MXNet .params reader against a file written by MXNet 1.9.1.

The fixture mxnet_resnet38_subset.params holds a few ResNet-38 arrays under their ImageNet names;
mxnet_resnet38_subset_expected.npz holds the same arrays as MXNet returned them, each name with
':' written as '__'.
"""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from network import resnet38d
from tool.errors import InputError

PARAMS = "mxnet_resnet38_subset.params"
EXPECTED_TORCH_NAMES = {
    "arg:conv1a_weight": "conv1a.weight",
    "arg:res2a_branch1_weight": "b2.conv_branch1.weight",
    "arg:res2a_branch2a_weight": "b2.conv_branch2a.weight",
    "arg:bn2a_branch2a_gamma": "b2.bn_branch2a.weight",
    "arg:bn2a_branch2a_beta": "b2.bn_branch2a.bias",
    "aux:bn2a_branch2a_moving_mean": "b2.bn_branch2a.running_mean",
    "aux:bn2a_branch2a_moving_var": "b2.bn_branch2a.running_var",
    "arg:res2b1_branch2b1_weight": "b2_1.conv_branch2b1.weight",
    "arg:bn7_gamma": "bn7.weight",
    "aux:bn7_moving_var": "bn7.running_var",
    "arg:linear1000_weight": None,
}


@pytest.fixture
def params_path(fixtures_dir) -> Path:
    return fixtures_dir / PARAMS


@pytest.fixture
def expected(fixtures_dir) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "mxnet_resnet38_subset_expected.npz") as z:
        return {k.replace("__", ":", 1): z[k] for k in z.files}


def test_reads_exactly_what_mxnet_wrote(params_path, expected):
    arrays = resnet38d.read_mxnet_params(params_path)
    assert list(arrays) == list(expected)
    for name, array in arrays.items():
        assert array.dtype == expected[name].dtype and array.shape == expected[name].shape, name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)


def test_names_map_to_our_parameters(params_path, expected):
    assert {k: resnet38d.mxnet_to_torch_name(k) for k in expected} == EXPECTED_TORCH_NAMES
    for mxnet_name, torch_name in [("arg:res4b3_branch2b1_weight", "b4_3.conv_branch2b1.weight"),
                                   ("arg:bn5b2_branch2a_beta", "b5_2.bn_branch2a.bias"),
                                   ("aux:bn6a_branch2b2_moving_mean", "b6.bn_branch2b2.running_mean"),
                                   ("arg:res7a_branch2b2_weight", "b7.conv_branch2b2.weight"),
                                   ("arg:linear1000_bias", None)]:
        assert resnet38d.mxnet_to_torch_name(mxnet_name) == torch_name
    with pytest.raises(InputError, match="unexpected parameter 'arg:fc9_weight'"):
        resnet38d.mxnet_to_torch_name("arg:fc9_weight")


def test_converted_weights_load_into_the_full_network(params_path, expected):
    converted = resnet38d.convert_mxnet_to_torch(params_path)
    assert set(converted) == {v for v in EXPECTED_TORCH_NAMES.values() if v is not None}
    model = resnet38d.Net()
    own = model.state_dict()
    for name, tensor in converted.items():
        assert own[name].shape == tensor.shape, name
    untouched = model.b3.conv_branch2a.weight.detach().clone()
    resnet38d.load_weights(model, params_path, strict=True)  # ImageNet weights always load non-strict
    loaded = model.state_dict()
    for mxnet_name, torch_name in EXPECTED_TORCH_NAMES.items():
        if torch_name is not None:
            np.testing.assert_array_equal(loaded[torch_name].numpy(), expected[mxnet_name])
    assert torch.equal(model.b3.conv_branch2a.weight, untouched)


def test_narrow_network_refuses_imagenet_weights(params_path):
    with pytest.raises(InputError, match=r"conv1a.weight has shape \(64, 3, 3, 3\) in the file but \(8, 3, 3, 3\)"):
        resnet38d.load_weights(resnet38d.Net(width=0.125), params_path, strict=False)


def write_params(path: Path, arrays: dict[str, np.ndarray], version: str) -> None:
    """An NDArray list file in an older layout: 'v1' (int64 shape after its magic) or
    'unversioned' (the rank, then uint32 dimensions)."""
    parts = [struct.pack("<QQQ", 0x112, 0, len(arrays))]
    for array in arrays.values():
        if version == "v1":
            parts.append(struct.pack("<II", 0xF993FAC8, array.ndim) + struct.pack(f"<{array.ndim}q", *array.shape))
        else:
            parts.append(struct.pack(f"<I{array.ndim}I", array.ndim, *array.shape))
        parts.append(struct.pack("<iii", 1, 0, {np.float32: 0, np.float64: 1}[array.dtype.type]))
        parts.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    parts.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        parts.append(struct.pack("<Q", len(name)) + name.encode())
    path.write_bytes(b"".join(parts))


@pytest.mark.parametrize("version", ["v1", "unversioned"])
def test_reads_older_layouts(tmp_path, version):
    arrays = {"arg:conv1a_weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
              "aux:bn7_moving_var": np.linspace(0, 1, 5)}
    path = tmp_path / "old.params"
    write_params(path, arrays, version)
    read = resnet38d.read_mxnet_params(path)
    assert list(read) == list(arrays)
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype
        np.testing.assert_array_equal(read[name], array)


def assert_one_line_input_error(path: Path) -> str:
    with pytest.raises(InputError) as info:
        resnet38d.read_mxnet_params(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("keep", [0, 7, 19, 50, 100_000, -30, -1])
def test_truncated_file_is_an_input_error(tmp_path, params_path, keep):
    data = params_path.read_bytes()
    path = tmp_path / "truncated.params"
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    message = assert_one_line_input_error(path)
    assert "truncated" in message


def overwrite(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


# Offsets in the fixture: header (16 bytes), array count (8), then the first array's magic (4),
# storage type (4), rank (4), dimensions (4 x 8), context (8) and type flag (4).
@pytest.mark.parametrize("offset, value, reason", [
    (0, struct.pack("<Q", 0x113), "wrong magic number"),
    (16, struct.pack("<Q", 10**12), "implausible array count"),
    (28, struct.pack("<i", 1), "sparse"),
    (32, struct.pack("<i", 99), "invalid rank"),
    (36, struct.pack("<q", -64), "negative dimension"),
    (36, struct.pack("<q", 10**9), "truncated"),
    (76, struct.pack("<i", 42), "unknown type flag"),
])
def test_corrupt_header_is_an_input_error(tmp_path, params_path, offset, value, reason):
    path = tmp_path / "corrupt.params"
    path.write_bytes(overwrite(params_path.read_bytes(), offset, value))
    assert reason in assert_one_line_input_error(path)


def test_corrupt_names_and_foreign_files_are_input_errors(tmp_path, params_path):
    data = params_path.read_bytes()
    path = tmp_path / "corrupt.params"
    path.write_bytes(data + b"\0")
    assert "unexpected bytes" in assert_one_line_input_error(path)

    last_name = b"arg:linear1000_weight"
    name_offset = data.rindex(last_name)
    path.write_bytes(overwrite(data, name_offset, b"\xff\xfe"))
    assert "not text" in assert_one_line_input_error(path)

    path.write_bytes(b"this is not an MXNet file at all, just some text")
    assert "wrong magic number" in assert_one_line_input_error(path)

    torch_file = tmp_path / "weights.params"
    torch.save({"conv1a.weight": torch.zeros(1)}, torch_file)
    assert_one_line_input_error(torch_file)
    with pytest.raises(InputError, match="not found"):
        resnet38d.load_weights(resnet38d.Net(width=0.125), tmp_path / "missing.params", strict=False)
    with pytest.raises(InputError, match="cannot open"):
        resnet38d.read_mxnet_params(tmp_path / "missing.params")
