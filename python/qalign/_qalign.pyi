"""Type stubs of the Rust extension (crates/qalign-py); use the wrappers in `qalign`."""

import os
from typing import List, Optional, Tuple, Union, final

__all__ = ["Scorer", "QAlignError", "__version__"]

__version__: str

class QAlignError(Exception):
    """An error from qalign, with the Rust message."""

_Outcome = Tuple[Optional[List[str]], Optional[str]]

@final
class Scorer:
    # `__new__`, not `__init__`: a PyO3 class is built by `#[new]`, which is `__new__`.
    def __new__(
        cls,
        model: str,
        device: str = "cpu",
        dtype: str = "f32",
        quant: Optional[str] = None,
        lora: Optional[Union[str, os.PathLike[str]]] = None,
        offline: bool = False,
        revision: Optional[str] = None,
    ) -> "Scorer": ...
    def score_paths(
        self,
        paths: List[str],
        tasks: List[str],
        scale: str = "1-5",
        batch_size: int = 8,
        stop_on_error: bool = False,
    ) -> List[_Outcome]: ...
    def score_bytes(
        self, data: Union[bytes, bytearray], name: str, tasks: List[str], scale: str = "1-5"
    ) -> _Outcome: ...
    def score_rgb(
        self, data: bytes, size: Tuple[int, int], name: str, tasks: List[str], scale: str = "1-5"
    ) -> List[str]: ...
    def levels(self) -> List[str]: ...
