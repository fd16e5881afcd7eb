"""Linear layers packed for oneDNN: same answers as nn.Linear, what is packed and fused, and the fallback."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from engine.models import builtin_repository, cpu_prepack
from engine.models.backends import load_model
from engine.models.cpu_prepack import PackedLinear, chain_call, prepack_linear
from engine.models.repository import load_model_spec, load_repository

pytestmark = pytest.mark.skipif(not cpu_prepack.available(), reason="this torch build has no oneDNN")

ROWS = (1, 2, 5, 64, 200)


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mlp(*sizes: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(3)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), act()]
    return nn.Sequential(*layers[:-1]).eval()


def samples(width: int) -> list[list[torch.Tensor]]:
    return [[seeded(rows, width, seed=rows)] for rows in (1, 3, 17)]


def outputs(model: nn.Module, width: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(seeded(rows, width, seed=100 + rows)) for rows in ROWS]


def test_sequential_is_packed_relu_fused_and_answers_the_same() -> None:
    model = mlp(32, 64, 48, 8)
    want = outputs(model, 32)
    assert prepack_linear(model, samples(32)) == 3
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["PackedLinear", "Identity", "PackedLinear", "Identity", "PackedLinear"]
    assert [m.relu for m in model if isinstance(m, PackedLinear)] == [True, True, False]
    for rows, a, b in zip(ROWS, want, outputs(model, 32), strict=True):
        assert b.shape == (rows, 8)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_other_activations_are_not_fused() -> None:
    model = mlp(16, 32, 4, act=nn.GELU)
    want = outputs(model, 16)
    assert prepack_linear(model, samples(16)) == 2
    assert isinstance(model[1], nn.GELU) and not model[0].relu
    for a, b in zip(want, outputs(model, 16), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


class Nested(nn.Module):
    """Linear layers as attributes, one of them read by weight in forward, one a subclass."""

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.encoder = nn.Sequential(nn.Linear(12, 24), nn.ReLU())
        self.head = nn.Linear(24, 6, bias=False)
        self.tied = self.Scaled(24, 24)
        self.wide = nn.Linear(12, 24).double()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.tied(self.encoder(x))
        return {"out": self.head(h), "tied": F.linear(h, self.head.weight), "wide": self.wide(x.double())}


def test_nested_layers_keep_their_weights_and_subclasses_stay() -> None:
    model = Nested().eval()
    with torch.inference_mode():
        want = [model(seeded(rows, 12, seed=rows)) for rows in ROWS]
    assert prepack_linear(model, [[seeded(4, 12)]]) == 2
    assert isinstance(model.encoder[0], PackedLinear) and model.encoder[0].relu
    assert isinstance(model.head, PackedLinear) and model.head.bias is None
    assert type(model.tied) is Nested.Scaled and type(model.wide) is nn.Linear  # subclass, float64
    # the original parameters stay reachable (and in the state dict under their names)
    assert set(model.state_dict()) == set(Nested().state_dict())
    with torch.inference_mode():
        got = [model(seeded(rows, 12, seed=rows)) for rows in ROWS]
    for a, b in zip(want, got, strict=True):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_three_dimensional_and_read_only_inputs() -> None:
    model = mlp(8, 16, 4)
    x = seeded(3, 5, 8)
    with torch.inference_mode():
        want = model(x)
    prepack_linear(model, samples(8))
    array = x.numpy().copy()
    array.flags.writeable = False
    with torch.inference_mode(), pytest.warns(UserWarning, match="not writable"):
        got = model(torch.from_numpy(array))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_wrong_width_fails_as_nn_linear_does() -> None:
    model = mlp(8, 16, 4)
    prepack_linear(model, samples(8))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        model(seeded(4, 9))


def test_a_model_that_disagrees_gets_its_layers_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = mlp(8, 16, 4)
    originals = list(model)
    real = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: real(self, x) + 1e-3)
    with caplog.at_level(logging.WARNING):
        assert prepack_linear(model, samples(8)) == 0
    assert list(model) == originals
    assert "differs" in caplog.text


def test_a_model_that_rejects_the_packed_layer_gets_its_layers_back(caplog: pytest.LogCaptureFixture) -> None:
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not isinstance(self.fc, nn.Linear):
                raise TypeError("fc must be an nn.Linear")
            return self.fc(x)

    model = Picky().eval()
    with caplog.at_level(logging.WARNING):
        assert prepack_linear(model, [[seeded(3, 4)]]) == 0
    assert type(model.fc) is nn.Linear
    assert "TypeError: fc must be an nn.Linear" in caplog.text


def test_without_onednn_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_prepack, "available", lambda: False)
    model = mlp(8, 16, 4)
    assert prepack_linear(model, samples(8)) == 0
    assert type(model[0]) is nn.Linear


def test_nothing_packable() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 4).double()).eval()
    assert prepack_linear(model, [[seeded(2, 4).double()]]) == 0
    assert type(model[1]) is nn.Linear


def packed_mlp(*sizes: int) -> nn.Sequential:
    model = mlp(*sizes)
    assert prepack_linear(model, samples(sizes[0])) == len(sizes) - 1
    return model


def test_the_chain_computes_exactly_what_the_packed_sequential_does() -> None:
    model = packed_mlp(32, 64, 48, 8)
    call = chain_call(model)
    assert call is not None
    with torch.inference_mode():
        for rows in ROWS:
            x = seeded(rows, 32, seed=200 + rows)
            assert torch.equal(call(x), model(x))  # the same oneDNN calls: bit for bit
        x3 = seeded(3, 5, 32)
        assert torch.equal(call(x3), model(x3))
        empty = torch.zeros(0, 32)
        assert call(empty).shape == model(empty).shape == (0, 8)


def test_the_chain_hands_what_the_packed_path_refuses_to_the_module() -> None:
    model = packed_mlp(8, 16, 4)
    call = chain_call(model)
    assert call is not None
    with torch.inference_mode():
        row = seeded(1, 8)
        assert torch.equal(call(row), model(row))  # one row: nn.Linear's gemv path
        wide = seeded(3, 8).double()
        with pytest.raises(RuntimeError) as chain_err:
            call(wide)
        with pytest.raises(RuntimeError) as module_err:
            model(wide)
        assert str(chain_err.value) == str(module_err.value)
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            call(seeded(4, 9))


def test_no_chain_where_it_would_not_compute_the_same() -> None:
    gelu = mlp(16, 32, 4, act=nn.GELU)
    prepack_linear(gelu, samples(16))
    assert chain_call(gelu) is None  # an unfused activation between the layers

    class Doubled(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    sub = Doubled(nn.Linear(8, 4)).eval()
    prepack_linear(sub, samples(8))
    assert isinstance(sub[0], PackedLinear) and chain_call(sub) is None

    nested = Nested().eval()
    prepack_linear(nested, [[seeded(4, 12)]])
    assert chain_call(nested) is None
    assert chain_call(mlp(8, 4)) is None  # nothing packed


@pytest.mark.parametrize("where", ["sequential", "layer", "identity", "global"])
def test_no_chain_when_a_hook_would_be_skipped(where: str) -> None:
    model = packed_mlp(8, 16, 4)
    seen: list[str] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        seen.append(type(module).__name__)

    if where == "global":
        handle = nn.modules.module.register_module_forward_hook(hook)
    else:
        target = {"sequential": model, "layer": model[2], "identity": model[1]}[where]
        handle = target.register_forward_hook(hook)
    try:
        assert chain_call(model) is None
    finally:
        handle.remove()
    assert chain_call(model) is not None


def test_builtin_mlp_loads_packed_and_answers_like_the_plain_one() -> None:
    spec = load_repository(builtin_repository()).specs["mlp"]
    assert spec.prepack_linear
    packed = load_model(spec, "cpu")
    plain = load_model(spec.__class__(**{**spec.__dict__, "prepack_linear": False}), "cpu")
    module: Any = packed._fn
    assert [type(m).__name__ for m in module] == ["PackedLinear", "Identity", "PackedLinear"]
    assert all(type(m) is not PackedLinear for m in plain._fn.modules())  # type: ignore[attr-defined]
    assert packed._call is not module and plain._call is plain._fn  # the packed one runs as a chain
    rng = np.random.default_rng(7)
    for rows in (1, 2, 23, 256):
        x = torch.from_numpy(rng.standard_normal((rows, 256), dtype=np.float32))
        (a,) = plain.run([x])
        (b,) = packed.run([x])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_model_yaml_switch_loads_a_user_model_packed(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "model.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2))\n"
    )
    data = {
        "backend": "torch",
        "max_batch_size": 8,
        "prepack_linear": True,
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [6]}],
        "outputs": [{"name": "Y", "datatype": "FP32", "shape": [2]}],
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(data))
    model = load_model(load_model_spec(folder), "cpu")
    module: Any = model._fn
    assert isinstance(module[0], PackedLinear) and isinstance(module[2], PackedLinear)
    assert model._call is not module
    (out,) = model.run([seeded(5, 6)])
    assert out.shape == (5, 2)


def test_row_buckets_pad_at_most_an_eighth_with_eight_sizes_per_doubling() -> None:
    bucket_rows = cpu_prepack.bucket_rows
    assert [bucket_rows(n) for n in range(17)] == list(range(17))  # small batches run as they are
    padded = {17: 18, 18: 18, 19: 20, 33: 36, 100: 104, 129: 144, 256: 256, 257: 288}
    assert {n: bucket_rows(n) for n in padded} == padded
    previous = 0
    for rows in range(1, 5000):
        bucket = bucket_rows(rows)
        assert rows <= bucket <= rows * 1.125
        assert bucket_rows(bucket) == bucket
        assert bucket >= previous
        previous = bucket
    for low in (16, 32, 64, 128, 1024):
        assert len({bucket_rows(n) for n in range(low + 1, 2 * low + 1)}) == 8
    sizes = cpu_prepack.bucket_sizes(256)
    assert len(sizes) == 15 + 4 * 8 and sizes[0] == 2 and sizes[-1] == 256
    assert {bucket_rows(n) for n in range(2, 257)} == set(sizes)
    assert cpu_prepack.bucket_sizes(250)[-1] == 256  # the largest batch's bucket, above it
    assert cpu_prepack.bucket_sizes(1) == ()


def onednn_shapes(run: Any, capfd: pytest.CaptureFixture[str]) -> tuple[list[int], list[str]]:
    """The batch rows of the oneDNN inner products ``run()`` executes, and how each was created."""
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        run()
    lines = [line for line in capfd.readouterr().out.splitlines() if ",inner_product," in line]
    rows = [int(m) for line in lines if ",exec," in line for m in re.findall(r"\bmb(\d+)ic", line)[:1]]
    created = re.findall(r"create:(cache_\w+)", "\n".join(lines))
    return rows, created


@pytest.mark.parametrize("how", ["chain", "module"])
def test_packed_layers_compute_at_the_bucket_and_answer_for_the_real_rows(
    how: str, capfd: pytest.CaptureFixture[str]
) -> None:
    plain = mlp(32, 64, 8)
    model = packed_mlp(32, 64, 8)
    run = chain_call(model) if how == "chain" else model
    assert run is not None
    for rows in (17, 33, 100, 129):
        x = seeded(rows, 32, seed=300 + rows)
        with torch.inference_mode():
            want = plain(x)
            got: list[torch.Tensor] = []
            computed, _ = onednn_shapes(lambda x=x, got=got: got.append(run(x)), capfd)
        assert computed == [cpu_prepack.bucket_rows(rows)] * 2  # both layers, padded
        assert got[0].shape == (rows, 8) and got[0].is_contiguous()
        torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5)


def test_a_loaded_packed_model_builds_no_kernel_under_load(capfd: pytest.CaptureFixture[str]) -> None:
    spec = load_repository(builtin_repository()).specs["mlp"]
    assert spec.warmup_batch_sizes == (1,)  # the buckets are warmed without being asked
    model = load_model(spec, "cpu")
    assert model.warmup_sizes == (1, *cpu_prepack.bucket_sizes(spec.max_batch_size))
    batches = (2, 17, 37, 100, 131, 255, 256)
    with torch.inference_mode():
        computed, created = onednn_shapes(lambda: [model.run([seeded(n, 256)]) for n in batches], capfd)
    assert computed == [cpu_prepack.bucket_rows(n) for n in batches for _ in range(2)]
    assert created and set(created) == {"cache_hit"}  # every kernel was built at load
    plain = load_model(spec.__class__(**{**spec.__dict__, "prepack_linear": False}), "cpu")
    assert plain.warmup_sizes == spec.warmup_batch_sizes
