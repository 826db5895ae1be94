"""sdrt build side: load checkpoints, trace them to ONNX, verify, optimize, build engines.

Imports PyTorch, diffusers and transformers; the runtime (`sdrt`) never imports this package
except from the CLI commands that build.
"""

import os

# Library chatter (missing optional accelerators, torchvision fallbacks) drowns our progress
# output; users can still raise it through the same variables.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
