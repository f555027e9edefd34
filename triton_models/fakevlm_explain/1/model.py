"""Triton Python-backend model for FakeVLM: moderation.model.triton_model does the work.

The same file serves triton_models/fakevlm (verdicts) and triton_models/fakevlm_explain (explanations); each
config.pbtxt's `role` parameter says which. Only this file can import the stub's triton_python_backend_utils.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from moderation.model.triton_model import FakeVLMTritonModel


class TritonPythonModel(FakeVLMTritonModel):
    def __init__(self) -> None:
        super().__init__(pb_utils)
