"""The gateway's request checks (`servers.gateway_requests`): inputs against the model, prepared once
per model (`InputChecks`), and the output mask."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from engine.errors import InvalidArgument
from engine.models.spec import ModelSpec, TensorSpec
from servers.gateway_api import InferInput
from servers.gateway_requests import MAX_KNOWN_SHAPES, InputChecks, output_mask, validate_inputs

BATCHED = ModelSpec(
    name="pair",
    backend="python",
    inputs=(TensorSpec("A", "FP32", (4,)), TensorSpec("B", "INT32", (-1, 2))),
    outputs=(TensorSpec("X", "FP32", (4,)), TensorSpec("Y", "INT32", (-1,))),
    max_batch_size=8,
)
FIXED = ModelSpec(
    name="fixed",
    backend="python",
    inputs=(TensorSpec("IN", "UINT8", (2, 3)),),
    outputs=(TensorSpec("OUT", "UINT8", (2, 3)),),
)


def a_input(rows: int = 3, name: str = "A") -> InferInput:
    return InferInput(name, "FP32", (rows, 4), np.zeros((rows, 4), np.float32))


def b_input(rows: int = 3, cols: int = 5) -> InferInput:
    return InferInput("B", "INT32", (rows, cols, 2), np.zeros((rows, cols, 2), np.int32).tobytes())


def test_inputs_in_the_models_order_come_back_with_codes_shapes_and_byte_counts() -> None:
    a, b = a_input(), b_input()
    ordered = InputChecks(BATCHED).check([a, b])
    assert [(item, shape, nbytes) for _, item, shape, nbytes in ordered] == [
        (a, (3, 4), 48),
        (b, (3, 5, 2), 120),
    ]
    assert ordered[0][0] != ordered[1][0]  # FP32 and INT32 codes


def test_inputs_in_another_order_are_put_in_the_models() -> None:
    a, b = a_input(), b_input()
    assert [item for _, item, _, _ in InputChecks(BATCHED).check([b, a])] == [a, b]


def test_shapes_of_numpy_integers_or_lists_are_plain_int_tuples() -> None:
    a = InferInput("A", "FP32", [np.int64(2), np.int32(4)], bytes(32))  # type: ignore[arg-type]
    b = InferInput("B", "INT32", (np.uint8(2), 1, 2), bytes(16))
    ordered = InputChecks(BATCHED).check([a, b])
    assert [shape for _, _, shape, _ in ordered] == [(2, 4), (2, 1, 2)]
    assert all(type(d) is int for _, _, shape, _ in ordered for d in shape)


def test_a_model_without_batching_takes_exactly_its_shape() -> None:
    good = InferInput("IN", "UINT8", (2, 3), bytes(6))
    assert InputChecks(FIXED).check([good])[0][2:] == ((2, 3), 6)
    with pytest.raises(InvalidArgument, match="does not match"):
        InputChecks(FIXED).check([InferInput("IN", "UINT8", (1, 2, 3), bytes(6))])


REFUSALS: list[tuple[list[InferInput], str]] = [
    ([a_input()], "needs input 'B'"),
    ([a_input(), b_input(), a_input(name="C")], "has no input 'C'"),
    ([a_input(), a_input(), b_input()], "given twice"),
    ([a_input(), InferInput("B", "FP32", (3, 5, 2), bytes(120))], "datatype FP32 does not match"),
    ([a_input(), InferInput("B", "INT32", (3, 10), bytes(120))], "does not match"),
    ([InferInput("A", "FP32", (3, 5), bytes(60)), b_input()], "does not match"),
    ([a_input(), InferInput("B", "INT32", (3, -5, 2), b"")], "negative dimension"),
    ([a_input(), InferInput("B", "INT32", (3, 1 << 30, 1 << 30), b"")], "shape .* does not match"),
    ([a_input(), InferInput("B", "INT32", (3, 1 << 40, 2), b"")], "too large"),
    ([a_input(), InferInput("B", "INT32", (3, 5, 2), bytes(119))], "119 bytes given"),
    ([a_input(3), b_input(2)], "disagree on the batch size"),
    ([a_input(9), b_input(9)], "batch size 9 is outside 1..8"),
    ([a_input(0), b_input(0)], "batch size 0 is outside 1..8"),
]


@pytest.mark.parametrize(("inputs", "message"), REFUSALS)
def test_refusals_name_what_is_wrong(inputs: list[InferInput], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        InputChecks(BATCHED).check(inputs)


@pytest.mark.parametrize(("inputs", "message"), REFUSALS)
def test_refusals_are_the_same_once_the_shapes_are_known(inputs: list[InferInput], message: str) -> None:
    # shapes that passed are remembered per input (a hit skips the per-dimension checks): a hit
    # must still refuse a wrong byte count, a batch size out of range or inputs that disagree
    checks = InputChecks(BATCHED)
    for rows in (2, 3, 9, 0):
        with contextlib.suppress(InvalidArgument):  # 9 and 0 are refused: nothing of theirs is kept
            checks.check([a_input(rows), b_input(rows)])
    assert {shape for known in checks._known for _, shape in known} == {(2, 4), (3, 4), (2, 5, 2), (3, 5, 2)}
    with pytest.raises(InvalidArgument, match=message):
        checks.check(inputs)


def test_known_shapes_stay_bounded_and_answers_stay_right() -> None:
    checks = InputChecks(BATCHED)
    for cols in range(1, 201):
        first, again = (checks.check([a_input(1), b_input(1, cols)]) for _ in range(2))
        assert first[1][2:] == again[1][2:] == ((1, cols, 2), cols * 8)
        with pytest.raises(InvalidArgument, match="bytes given"):
            checks.check([a_input(1), InferInput("B", "INT32", (1, cols, 2), bytes(cols * 8 - 1))])
    assert 0 < len(checks._known[1]) <= MAX_KNOWN_SHAPES


def test_validate_inputs_is_the_prepared_check() -> None:
    a, b = a_input(), b_input()
    assert validate_inputs(BATCHED, [b, a]) == InputChecks(BATCHED).check([a, b])


def test_output_mask() -> None:
    assert output_mask(BATCHED, None) == 0
    assert output_mask(BATCHED, ["Y"]) == 0b10
    assert output_mask(BATCHED, ["Y", "X"]) == 0b11
    with pytest.raises(InvalidArgument, match="no output 'Z'"):
        output_mask(BATCHED, ["Z"])
