"""sdrt runtime: run an exported Stable Diffusion bundle with numpy and an engine backend.

Never imports torch; `import sdrt` must work on a machine that has only the runtime installed.
"""

from .errors import UserError
from .pipeline import Pipeline, PipelineOutput

__version__ = "0.1.0"

__all__ = ["Pipeline", "PipelineOutput", "UserError", "__version__"]
