"""Triton's model configuration schema (tritonclient ships model_config_pb2), loaded on its own.

Importing it as `tritonclient.grpc.model_config_pb2` runs `tritonclient.grpc`'s __init__, which
registers Triton's gRPC service messages (package `inference`) in protobuf's default pool; KServe's
client registers its own messages of the same names, and whichever comes second fails in the same
process ("duplicate symbol 'inference.ServerLiveRequest'"). model_config.proto alone does not clash.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "verity_tests_triton_model_config_pb2"


def model_config_pb2() -> ModuleType:
    if _NAME not in sys.modules:
        package = importlib.util.find_spec("tritonclient")
        assert package is not None and package.origin, "tritonclient is a dev dependency"
        path = Path(package.origin).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location(_NAME, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]
