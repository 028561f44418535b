"""Tensors of the Open Inference Protocol (v2) REST form: an infer request's body -> arrays,
and arrays -> an infer response's body, in JSON or with the binary tensor data extension.

A body with the `Inference-Header-Content-Length` header is that many bytes of JSON followed
by the binary data of every input whose `parameters.binary_data_size` is set, in input order.
A response with binary outputs is built the same way. Tensor data in JSON is row-major, flat
or nested. Every problem with the request raises InvalidRequest (answered 400).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .request import InvalidRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
MAX_NESTING = 8


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON document, the binary data after it) of an infer request body."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise InvalidRequest(f"{HEADER_LENGTH} is not an integer") from None
        if not 0 <= size <= len(body):
            raise InvalidRequest(f"{HEADER_LENGTH}={size} is outside the body of "
                                 f"{len(body)} bytes")
    try:
        doc = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the request must be a JSON object")
    return doc, body[size:]


def read_inputs(doc: dict[str, Any], binary: bytes,
                datatypes: dict[str, str]) -> dict[str, np.ndarray]:
    """Each input of `doc` by name, as an array of its shape; `datatypes` says which inputs
    exist and the datatype each must have."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("'inputs' must be a non-empty list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for spec in inputs:
        if not isinstance(spec, dict):
            raise InvalidRequest("each input must be an object")
        name = spec.get("name")
        if name not in datatypes:
            raise InvalidRequest(f"unknown input {name!r}; inputs: {', '.join(datatypes)}")
        if name in arrays:
            raise InvalidRequest(f"input {name} is given twice")
        if spec.get("datatype") != datatypes[name]:
            raise InvalidRequest(f"input {name}: datatype {spec.get('datatype')!r}, "
                                 f"expected {datatypes[name]}")
        shape = _shape(name, spec.get("shape"))
        dtype, count = DTYPES[datatypes[name]], math.prod(shape)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if "data" in spec:
                raise InvalidRequest(f"input {name}: both 'data' and binary_data_size")
            if type(size) is not int or size != count * dtype.itemsize:
                raise InvalidRequest(f"input {name}: binary_data_size {size!r}, expected "
                                     f"{count * dtype.itemsize} for shape {shape}")
            if offset + size > len(binary):
                raise InvalidRequest(f"input {name}: binary data ends after "
                                     f"{len(binary) - offset} of its {size} bytes")
            array = np.frombuffer(binary, dtype, count, offset).reshape(shape)
            offset += size
        else:
            array = _from_json(name, spec.get("data"), dtype, shape)
        arrays[name] = array
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return arrays


def _shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidRequest(f"input {name}: shape must be a list of non-negative integers")
    return shape


def _from_json(name: str, data: Any, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if data is None:
        raise InvalidRequest(f"input {name} has neither 'data' nor binary_data_size")
    flat = _flatten(name, data, 0)
    if len(flat) != math.prod(shape):
        raise InvalidRequest(f"input {name}: {len(flat)} values for shape {shape}")
    if dtype.kind in "iu":
        ok = all(type(v) is int for v in flat)
    else:
        ok = all(type(v) in (int, float) for v in flat)
    if not ok:
        raise InvalidRequest(f"input {name}: every value must be a "
                             f"{'n integer' if dtype.kind in 'iu' else ' number'}")
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidRequest(f"input {name}: a value is out of range for {dtype}") from None


def _flatten(name: str, data: Any, depth: int) -> list:
    if not isinstance(data, list):
        return [data]
    if depth > MAX_NESTING:
        raise InvalidRequest(f"input {name}: data nested too deeply")
    if all(not isinstance(v, list) for v in data):
        return data
    return [v for part in data for v in _flatten(name, part, depth + 1)]


def requested_outputs(doc: dict[str, Any], known: tuple[str, ...],
                      default: tuple[str, ...]) -> list[OutputRequest]:
    """The outputs to return and whether each goes binary (per output `binary_data`, else the
    request's `binary_data_output`); `default` when the request names none."""
    params = doc.get("parameters") or {}
    binary = params.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise InvalidRequest("parameter binary_data_output must be true or false")
    outputs = doc.get("outputs")
    if outputs is None:
        return [OutputRequest(name, binary) for name in default]
    if not isinstance(outputs, list):
        raise InvalidRequest("'outputs' must be a list")
    wanted: list[OutputRequest] = []
    for spec in outputs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in known:
            raise InvalidRequest(f"unknown output {name!r}; outputs: {', '.join(known)}")
        if any(w.name == name for w in wanted):
            raise InvalidRequest(f"output {name} is asked for twice")
        p = spec.get("parameters") or {}
        extra = set(p) - {"binary_data"}
        if extra:
            raise InvalidRequest(f"output {name}: unsupported parameters {sorted(extra)}")
        this = p.get("binary_data", binary)
        if not isinstance(this, bool):
            raise InvalidRequest(f"output {name}: binary_data must be true or false")
        wanted.append(OutputRequest(name, this))
    return wanted


def response_body(head: dict[str, Any], outputs: list[tuple[OutputRequest, str, np.ndarray]]
                  ) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when no output is binary) of an infer response;
    `head` holds model_name, id and the like, `outputs` (request, datatype, array)."""
    entries, chunks = [], []
    for want, datatype, array in outputs:
        entry: dict[str, Any] = {"name": want.name, "datatype": datatype,
                                 "shape": list(array.shape)}
        if want.binary:
            data = np.ascontiguousarray(array, DTYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    header = json.dumps({**head, "outputs": entries}, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
