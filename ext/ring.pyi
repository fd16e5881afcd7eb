"""Type stubs for ext.ring (compiled)."""

import numpy as np

from ext.segment import Segment

DESC_DTYPE: np.dtype
DESC_SIZE: int
HEADER_SIZE: int
MAX_CAPACITY: int

Desc = tuple[int, int, int, int, int, int, int, int, int, int]

def ring_footprint(capacity: int) -> int: ...

class Ring:
    segment: Segment
    offset: int
    capacity: int
    @staticmethod
    def create(segment: Segment, offset: int, capacity: int) -> Ring: ...
    @staticmethod
    def attach(segment: Segment, offset: int) -> Ring: ...
    def push(
        self,
        kind: int,
        model: int,
        req_id: int,
        offset: int = 0,
        length: int = 0,
        deadline_ns: int = 0,
        aux: int = 0,
        aux2: int = 0,
        status: int = 0,
        gen: int = 0,
    ) -> bool: ...
    def pop(self) -> Desc | None: ...
    def push_burst(self, descs: np.ndarray) -> int: ...
    def pop_into(self, out: np.ndarray) -> int: ...
    def pop_burst(self, max_n: int) -> np.ndarray: ...
    def reset(self) -> None: ...
    @property
    def epoch(self) -> int: ...
    @property
    def head(self) -> int: ...
    @property
    def tail(self) -> int: ...
    def __len__(self) -> int: ...
    def is_empty(self) -> bool: ...
    def is_full(self) -> bool: ...
