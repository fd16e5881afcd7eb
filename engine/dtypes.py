"""KServe v2 datatypes: names, numpy dtypes, sizes and the one-byte codes used in shared memory.

Pure numpy, no torch: front-ends import it on the request path.
"""

from __future__ import annotations

import numpy as np

from engine.errors import InvalidArgument

#: KServe datatype name -> numpy dtype. BYTES (variable-length strings) is not supported by the
#: shared-memory path; configs that name it are rejected at load.
KSERVE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}

NUMPY_TO_KSERVE: dict[np.dtype, str] = {v: k for k, v in KSERVE_TO_NUMPY.items()}

#: Stable one-byte codes written into shared-memory request/response headers. Never renumber.
DTYPE_CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(KSERVE_TO_NUMPY)}
CODE_TO_DTYPE: dict[int, str] = {v: k for k, v in DTYPE_CODES.items()}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a KServe datatype name; InvalidArgument when unknown or unsupported."""
    try:
        return KSERVE_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidArgument(
            f"unsupported datatype {datatype!r}; supported: {', '.join(KSERVE_TO_NUMPY)}"
        ) from None


def kserve_name(dtype: np.dtype) -> str:
    """The KServe datatype name of a numpy dtype; InvalidArgument when it has none."""
    try:
        return NUMPY_TO_KSERVE[np.dtype(dtype)]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {dtype} has no KServe datatype") from None
