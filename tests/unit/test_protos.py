"""The generated stubs are current, and our messages match Triton's (tritonclient's) on the wire."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_pb

import protos
from protos import generate
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc

# --- generation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return generate.render()


def test_committed_stubs_are_current(rendered: dict[str, str]) -> None:
    assert generate.stale(rendered) == [], "run `python -m protos.generate` and commit the stubs"
    assert generate.main(["--check"]) == 0


def test_check_reports_changed_missing_and_leftover_files(rendered: dict[str, str], tmp_path: Path) -> None:
    assert generate.write(rendered, tmp_path) == sorted(rendered)
    assert generate.stale(rendered, tmp_path) == []
    assert generate.write(rendered, tmp_path) == []  # idempotent: nothing rewritten

    (tmp_path / "grpc_service_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "model_config_pb2.pyi").unlink()
    (tmp_path / "old_pb2.py").write_text("")
    assert generate.stale(rendered, tmp_path) == ["grpc_service_pb2.py", "model_config_pb2.pyi", "old_pb2.py"]

    generate.write(rendered, tmp_path)
    assert generate.stale(rendered, tmp_path) == []
    assert not (tmp_path / "old_pb2.py").exists()


def test_stubs_import_through_the_package(rendered: dict[str, str]) -> None:
    for name, text in rendered.items():
        lines = text.splitlines()
        assert not [ln for ln in lines if ln.startswith("import ") and "_pb2" in ln], name
        if name.endswith("_pb2.py"):
            assert "_descriptor_pool.Default()" not in text
    assert callable(pb_grpc.add_GRPCInferenceServiceServicer_to_server)


# --- wire compatibility with tritonclient --------------------------------------------------------


def _messages(file: FileDescriptor) -> list[Descriptor]:
    """Every message of a file, nested ones included."""

    def walk(message: Descriptor) -> Iterator[Descriptor]:
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    return [m for top in file.message_types_by_name.values() for m in walk(top)]


def _enums(file: FileDescriptor) -> list[EnumDescriptor]:
    enums = list(file.enum_types_by_name.values())
    for message in _messages(file):
        enums.extend(message.enum_types)
    return enums


@pytest.mark.parametrize("theirs", [triton_pb.DESCRIPTOR, triton_mc.DESCRIPTOR], ids=lambda f: f.name)
def test_every_triton_field_has_the_same_number_and_type(theirs: FileDescriptor) -> None:
    pool = protos.POOL
    for message in _messages(theirs):
        ours = pool.FindMessageTypeByName(message.full_name)
        for field in message.fields:
            mine = ours.fields_by_name.get(field.name)
            assert mine is not None, f"{message.full_name}.{field.name} is missing"
            where = f"{message.full_name}.{field.name}"
            assert mine.number == field.number, where
            assert mine.type == field.type, where
            assert mine.is_repeated == field.is_repeated, where
            if field.message_type is not None:
                assert mine.message_type.full_name == field.message_type.full_name, where
            if field.enum_type is not None:
                assert mine.enum_type.full_name == field.enum_type.full_name, where
            if field.containing_oneof is not None:
                assert mine.containing_oneof.name == field.containing_oneof.name, where
    for enum in _enums(theirs):
        ours_enum = pool.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in ours_enum.values}


def test_service_methods_match_triton() -> None:
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    for method in theirs.methods:
        mine = ours.methods_by_name[method.name]
        assert mine.input_type.full_name == method.input_type.full_name
        assert mine.output_type.full_name == method.output_type.full_name
        assert (mine.client_streaming, mine.server_streaming) == (
            method.client_streaming,
            method.server_streaming,
        )


def _infer_request(module: object) -> object:
    request = module.ModelInferRequest(model_name="simple", model_version="1", id="req-7")  # type: ignore[attr-defined]
    request.parameters["priority"].int64_param = 3
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    tensor.parameters["binary_data_size"].int64_param = 64
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1.5, -2.0])
    request.outputs.add(name="OUTPUT0")
    request.raw_input_contents.append(bytes(range(64)))
    return request


def test_infer_request_is_byte_identical_both_ways() -> None:
    ours, theirs = _infer_request(pb), _infer_request(triton_pb)
    ours_bytes = ours.SerializeToString(deterministic=True)  # type: ignore[attr-defined]
    theirs_bytes = theirs.SerializeToString(deterministic=True)  # type: ignore[attr-defined]
    assert ours_bytes == theirs_bytes
    assert triton_pb.ModelInferRequest.FromString(ours_bytes) == theirs
    assert pb.ModelInferRequest.FromString(theirs_bytes) == ours


def test_responses_parse_with_tritonclient() -> None:
    response = pb.ModelInferResponse(model_name="simple", model_version="1", id="x")
    response.outputs.add(name="OUTPUT0", datatype="INT32", shape=[1, 16])
    response.raw_output_contents.append(b"\x01" * 64)
    stream = pb.ModelStreamInferResponse(error_message="boom", infer_response=response)
    parsed = triton_pb.ModelStreamInferResponse.FromString(stream.SerializeToString())
    assert parsed.error_message == "boom"
    assert parsed.infer_response.outputs[0].shape == [1, 16]
    assert parsed.infer_response.raw_output_contents[0] == b"\x01" * 64

    config = pb.ModelConfigResponse(
        config=mc.ModelConfig(
            name="simple",
            max_batch_size=8,
            input=[mc.ModelInput(name="INPUT0", data_type=mc.TYPE_INT32, dims=[16])],
            dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=100),
        )
    )
    parsed_config = triton_pb.ModelConfigResponse.FromString(config.SerializeToString()).config
    assert parsed_config.input[0].data_type == triton_mc.TYPE_INT32
    assert parsed_config.dynamic_batching.max_queue_delay_microseconds == 100
    assert parsed_config.WhichOneof("scheduling_choice") == "dynamic_batching"


def test_our_pool_is_separate_from_the_default_pool() -> None:
    # Both definitions of inference.* load in one process: ours in protos.POOL, Triton's in the default.
    assert pb.DESCRIPTOR.pool is protos.POOL
    assert triton_pb.DESCRIPTOR.pool is descriptor_pool.Default()
    assert pb.ModelInferRequest is not triton_pb.ModelInferRequest
