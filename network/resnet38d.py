"""Wide ResNet-38 ("model A1", output stride 8) and its weight loaders (input normalisation:
:mod:`tool.imutils`).

Parameter names equal the released ones (SEAM, SBNet, PSA), so their checkpoints load with
``strict=True`` and the ImageNet weights (an MXNet ``.params`` file) load without MXNet.
"""
from __future__ import annotations

import math
import pickle
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tool.errors import InputError

# Channels of the full-width network at the BN-ReLU inputs of b2, b3, b4, b5, b6, b7 and after bn7.
FULL_WIDTH_CHANNELS = {"conv1": 64, "conv2": 128, "conv3": 256, "conv4": 512, "conv5": 1024,
                       "conv6": 2048, "conv7": 4096}


class ResBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU, then 3x3 -> 3x3; the shortcut starts after BN-ReLU."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        if first_dilation is None:
            first_dilation = dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_input_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the block output and its BN-ReLU input activation."""
        x_bn_relu = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(x_bn_relu)
        branch = self.conv_branch2a(x_bn_relu)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return shortcut + branch, x_bn_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_input_activation(x)[0]


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck: 1x1 -> out/4, dilated 3x3 -> out/2, 1x1 -> out, with dropout
    before the last two convolutions. The shortcut is always a 1x1 convolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_input_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the block output and its BN-ReLU input activation."""
        x_bn_relu = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(x_bn_relu)
        branch = self.conv_branch2a(x_bn_relu)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return shortcut + branch, x_bn_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_input_activation(x)[0]


class Net(nn.Module):
    """The ResNet-38 backbone.

    ``width`` scales every channel count (same parameter names, fewer channels); 1.0 is the
    released network. ``freeze_bn=True`` (faithful) keeps every BatchNorm in eval mode with
    frozen affine terms during training, as the released code does when starting from ImageNet
    weights; from random init pass ``freeze_bn=False`` so BatchNorm normalises with batch statistics.
    """

    def __init__(self, width: float = 1.0, freeze_bn: bool = True) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.freeze_bn = freeze_bn
        self.channels = {name: max(1, round(c * width)) for name, c in FULL_WIDTH_CHANNELS.items()}
        c = self.channels

        self.conv1a = nn.Conv2d(3, c["conv1"], 3, padding=1, bias=False)

        self.b2 = ResBlock(c["conv1"], c["conv2"], c["conv2"], stride=2)
        self.b2_1 = ResBlock(c["conv2"], c["conv2"], c["conv2"])
        self.b2_2 = ResBlock(c["conv2"], c["conv2"], c["conv2"])

        self.b3 = ResBlock(c["conv2"], c["conv3"], c["conv3"], stride=2)
        self.b3_1 = ResBlock(c["conv3"], c["conv3"], c["conv3"])
        self.b3_2 = ResBlock(c["conv3"], c["conv3"], c["conv3"])

        self.b4 = ResBlock(c["conv3"], c["conv4"], c["conv4"], stride=2)
        self.b4_1 = ResBlock(c["conv4"], c["conv4"], c["conv4"])
        self.b4_2 = ResBlock(c["conv4"], c["conv4"], c["conv4"])
        self.b4_3 = ResBlock(c["conv4"], c["conv4"], c["conv4"])
        self.b4_4 = ResBlock(c["conv4"], c["conv4"], c["conv4"])
        self.b4_5 = ResBlock(c["conv4"], c["conv4"], c["conv4"])

        self.b5 = ResBlock(c["conv4"], c["conv4"], c["conv5"], stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(c["conv5"], c["conv4"], c["conv5"], dilation=2)
        self.b5_2 = ResBlock(c["conv5"], c["conv4"], c["conv5"], dilation=2)

        self.b6 = ResBlockBottleneck(c["conv5"], c["conv6"], stride=1, dilation=4, dropout=0.3)
        self.b7 = ResBlockBottleneck(c["conv6"], c["conv7"], dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(c["conv7"])

        self.not_training: list[nn.Module] = [self.conv1a]
        self.from_scratch_layers: list[nn.Module] = []
        self.backbone_names = frozenset(self.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The final features conv7 (stride 8)."""
        return self.forward_as_dict(x)["conv7"]

    def forward_as_dict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features by name: conv1..conv6 are the BN-ReLU inputs of b2, b3, b4, b5, b6, b7
        (strides 1, 2, 4, 8, 8, 8); conv7 = ReLU(bn7(b7 output))."""
        x = self.conv1a(x)
        x, conv1 = self.b2.forward_with_input_activation(x)
        x = self.b2_2(self.b2_1(x))
        x, conv2 = self.b3.forward_with_input_activation(x)
        x = self.b3_2(self.b3_1(x))
        x, conv3 = self.b4.forward_with_input_activation(x)
        for block in (self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5):
            x = block(x)
        x, conv4 = self.b5.forward_with_input_activation(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_with_input_activation(x)
        x, conv6 = self.b7.forward_with_input_activation(x)
        conv7 = F.relu(self.bn7(x))
        return {"conv1": conv1, "conv2": conv2, "conv3": conv3, "conv4": conv4, "conv5": conv5,
                "conv6": conv6, "conv7": conv7}

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters never trained: those of ``not_training`` and, with ``freeze_bn``, BatchNorm's."""
        frozen = [p for module in self.not_training for p in module.parameters()]
        if self.freeze_bn:
            frozen += [p for m in self.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
        return frozen

    def train(self, mode: bool = True) -> Net:
        """Set the mode, then re-freeze: frozen parameters get no gradient and, with ``freeze_bn``,
        BatchNorm stays in eval mode so its running statistics do not move."""
        super().train(mode)
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def get_parameter_groups(self) -> tuple[list, list, list, list]:
        """Trainable parameters as the released optimiser groups them: (pretrained weights,
        pretrained biases, from-scratch weights, from-scratch biases).

        Convolutions in ``from_scratch_layers`` form the last two groups; every other convolution
        (and BatchNorm, when it is trained) the first two. Frozen parameters are left out.
        """
        groups: tuple[list, list, list, list] = ([], [], [], [])
        frozen = {id(p) for p in self.frozen_parameters()}
        from_scratch = {id(m) for m in self.from_scratch_layers}
        for m in self.modules():
            if not isinstance(m, nn.Conv2d | nn.BatchNorm2d):
                continue
            offset = 2 if id(m) in from_scratch else 0
            if m.weight is not None and id(m.weight) not in frozen:
                groups[offset].append(m.weight)
            if m.bias is not None and id(m.bias) not in frozen:
                groups[offset + 1].append(m.bias)
        return groups


# --- MXNet NDArray list files (.params), read without MXNet --------------------------------------

_MXNET_LIST_MAGIC = 0x112
_NDARRAY_V1_MAGIC = 0xF993FAC8  # int64 shape
_NDARRAY_V2_MAGIC = 0xF993FAC9  # storage type, int64 shape
_NDARRAY_V3_MAGIC = 0xF993FACA  # as V2, saved under NumPy shape semantics
_MAX_NDIM = 32
# mshadow type flags.
_MXNET_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8,
                 6: np.int64, 7: np.bool_, 8: np.int16, 9: np.uint16, 10: np.uint32, 11: np.uint64}


class _Reader:
    """Little-endian reads that raise InputError on a short file."""

    def __init__(self, f: BinaryIO, filename: str) -> None:
        self.f = f
        self.filename = filename
        self.remaining = Path(filename).stat().st_size

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.filename} is not a valid MXNet .params file: {what}")

    def bytes(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise self.fail(f"truncated while reading {what}")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"truncated while reading {what}")
        self.remaining -= n
        return data

    def scalars(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize("<" + fmt), what))

    def array(self, scalar_type: type, shape: tuple[int, ...], what: str) -> np.ndarray:
        dtype = np.dtype(scalar_type).newbyteorder("<")
        if math.prod(shape) * dtype.itemsize > self.remaining:  # before allocating
            raise self.fail(f"truncated while reading {what}")
        arr = np.empty(shape, dtype=dtype)
        if self.f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
            raise self.fail(f"truncated while reading {what}")
        self.remaining -= arr.nbytes
        return arr


def _read_shape(reader: _Reader, ndim: int, dim_format: str, what: str) -> tuple[int, ...]:
    if not 0 <= ndim <= _MAX_NDIM:
        raise reader.fail(f"{what} has an invalid rank {ndim}")
    dims = reader.scalars(f"{ndim}{dim_format}", what) if ndim else ()
    if any(d < 0 for d in dims):
        raise reader.fail(f"{what} has a negative dimension {dims}")
    return tuple(dims)


def _read_ndarray(reader: _Reader, index: int) -> np.ndarray:
    """One NDArray as ``NDArray::Save`` writes it (V2/V3, or the older V1 and unversioned forms)."""
    what = f"array {index}"
    (magic,) = reader.scalars("I", what)
    if magic in (_NDARRAY_V2_MAGIC, _NDARRAY_V3_MAGIC):
        (storage_type,) = reader.scalars("i", what)
        if storage_type != 0:
            raise reader.fail(f"{what} is sparse (storage type {storage_type}), weights are dense")
        (ndim,) = reader.scalars("i", what)
        shape = _read_shape(reader, ndim, "q", what)
    elif magic == _NDARRAY_V1_MAGIC:
        (ndim,) = reader.scalars("I", what)
        shape = _read_shape(reader, ndim, "q", what)
    else:  # unversioned: the magic is the rank, the dimensions are uint32
        shape = _read_shape(reader, magic, "I", what)
    if not shape and magic != _NDARRAY_V3_MAGIC:  # rank 0 is "no array", except under NumPy semantics
        return np.empty((0,), np.float32)
    reader.scalars("ii", what)  # context (device type, device id): arrays are loaded on the CPU
    (type_flag,) = reader.scalars("i", what)
    if type_flag not in _MXNET_DTYPES:
        raise reader.fail(f"{what} has an unknown type flag {type_flag}")
    return reader.array(_MXNET_DTYPES[type_flag], shape, what).astype(_MXNET_DTYPES[type_flag], copy=False)


def read_mxnet_params(filename: str | Path) -> dict[str, np.ndarray]:
    """Read an MXNet NDArray list file (``mx.nd.save``) into ``{name: array}`` in file order.

    Names keep MXNet's ``arg:``/``aux:`` prefixes. Raises InputError for a missing, truncated,
    corrupt or non-MXNet file.
    """
    filename = str(filename)
    try:
        f = open(filename, "rb")
    except OSError as e:
        raise InputError(f"cannot open MXNet weights {filename}: {e.strerror}") from None
    with f:
        reader = _Reader(f, filename)
        header, _reserved = reader.scalars("QQ", "the header")
        if header != _MXNET_LIST_MAGIC:
            raise reader.fail("wrong magic number")
        (count,) = reader.scalars("Q", "the array count")
        if count * 4 > reader.remaining:
            raise reader.fail(f"implausible array count {count}")
        arrays = [_read_ndarray(reader, i) for i in range(count)]
        (num_names,) = reader.scalars("Q", "the name count")
        if num_names != count:
            raise reader.fail(f"{num_names} names for {count} arrays")
        names = []
        for i in range(num_names):
            (length,) = reader.scalars("Q", f"name {i}")
            try:
                names.append(reader.bytes(length, f"name {i}").decode("utf-8"))
            except UnicodeDecodeError:
                raise reader.fail(f"name {i} is not text") from None
        if reader.remaining:
            raise reader.fail(f"{reader.remaining} unexpected bytes after the last name")
    if len(set(names)) != len(names):
        raise InputError(f"{filename} is not a valid MXNet .params file: a name appears twice")
    return dict(zip(names, arrays, strict=True))


_BN_SUFFIX = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
_BLOCK_PARAM = re.compile(r"(res|bn)(\d+)([a-z])(\d*)_(branch\w+?)_"
                          r"(weight|gamma|beta|moving_mean|moving_var)")
_BN7_PARAM = re.compile(r"bn7_(gamma|beta|moving_mean|moving_var)")


def mxnet_to_torch_name(name: str) -> str | None:
    """Our parameter name for an MXNet ResNet-38 name (``None`` for the dropped ImageNet classifier).

    ``arg:res4b3_branch2a_weight`` -> ``b4_3.conv_branch2a.weight``;
    ``aux:bn2a_branch2a_moving_mean`` -> ``b2.bn_branch2a.running_mean``.
    """
    short = name.split(":", 1)[-1]
    if short.startswith("linear1000"):
        return None
    if short == "conv1a_weight":
        return "conv1a.weight"
    if m := _BN7_PARAM.fullmatch(short):
        return f"bn7.{_BN_SUFFIX[m.group(1)]}"
    m = _BLOCK_PARAM.fullmatch(short)
    if m is None:
        raise InputError(f"unexpected parameter {name!r} in an MXNet ResNet-38 file")
    kind, stage, letter, index, branch, suffix = m.groups()
    block = f"b{stage}" if letter == "a" else f"b{stage}_{index}"
    if kind == "res" and suffix == "weight":
        return f"{block}.conv_{branch}.weight"
    if kind == "bn" and suffix in _BN_SUFFIX:
        return f"{block}.bn_{branch}.{_BN_SUFFIX[suffix]}"
    raise InputError(f"unexpected parameter {name!r} in an MXNet ResNet-38 file")


def convert_mxnet_to_torch(filename: str | Path) -> dict[str, torch.Tensor]:
    """The ImageNet ``.params`` file as a state_dict of our names (classifier dropped)."""
    converted = {}
    for name, array in read_mxnet_params(filename).items():
        torch_name = mxnet_to_torch_name(name)
        if torch_name is not None:
            converted[torch_name] = torch.from_numpy(array)
    return converted


# --- Loading weights into a network -------------------------------------------------------------

def _is_mxnet_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return path.suffix == ".params" or (len(head) == 8 and struct.unpack("<Q", head)[0] == _MXNET_LIST_MAGIC)


def _load_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from our checkpoint ({'model': state_dict, ...}) or a released one,
    without 'module.' prefixes; only tensors are unpickled."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise InputError(f"{path} is not a plain weights file: it asks to unpickle {refused.group(1)}, "
                             "which is refused (only tensors and plain containers are loaded)") from None
        raise InputError(f"{path} cannot be read as a torch weights file (corrupt or other format)") from None
    except Exception as e:  # torch.load fails on a foreign file with many error types
        raise InputError(f"{path} cannot be read as a torch weights file ({type(e).__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}, not a state_dict")
    return {_strip_prefix(k): v for k, v in data.items()
            if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _strip_prefix(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _shape_hint(in_backbone: bool) -> str:
    """What a shape mismatch most likely means: the backbone's shapes depend only on the width,
    a head's on the network type and the class count."""
    if in_backbone:
        return "another --backbone_width?"
    return "weights of another network type (SB / AffinityNet) or another class count (--dataset_classes)?"


def load_weights(model: nn.Module, path: str | Path, strict: bool) -> list[str]:
    """Load ImageNet MXNet weights (always non-strict: heads keep their init), one of our
    checkpoints or a released state_dict into ``model``; return the names left at their init.

    Non-strict loading (a training start) also skips head parameters whose shape differs, so
    that AffinityNet can start from an SB checkpoint's backbone. Raises InputError (one line)
    for a missing file, a file sharing no parameter name with ``model``, a backbone shape
    mismatch (e.g. another backbone width) or, with ``strict``, any mismatch, missing or
    unexpected parameter. A missing ``num_batches_tracked`` (older torch) is not an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    mxnet = _is_mxnet_file(path)
    state = convert_mxnet_to_torch(path) if mxnet else _load_torch_state(path)
    own = model.state_dict()
    if not own.keys() & state.keys():
        model_name = f"{type(model).__module__}.{type(model).__name__}"
        raise InputError(f"{path} shares no parameter name with {model_name}"
                         f" (first name in the file: {min(state) if state else 'none'})")
    strict = strict and not mxnet
    backbone = getattr(model, "backbone_names", frozenset(own))
    mismatched = [name for name, target in own.items() if name in state and state[name].shape != target.shape]
    for name in mismatched:
        if strict or name in backbone:
            raise InputError(f"{path}: parameter {name} has shape {tuple(state[name].shape)} in the file but "
                             f"{tuple(own[name].shape)} in the model ({_shape_hint(name in backbone)})")
    state = {k: v for k, v in state.items() if k not in mismatched}
    if strict:
        missing = [k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked")]
        unexpected = state.keys() - own.keys()
        if missing or unexpected:
            first_missing = f" (first: {min(missing)})" if missing else ""
            first_unexpected = f" (first: {min(unexpected)})" if unexpected else ""
            raise InputError(f"{path} does not match the model: {len(missing)} missing parameters"
                             f"{first_missing}, {len(unexpected)} unexpected{first_unexpected}")
    model.load_state_dict(state, strict=False)
    return sorted(own.keys() - state.keys())
