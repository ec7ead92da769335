"""apq: joint architecture, pruning and quantization search with compiled, measured artifacts.

The source folders of the repository (toolchain/, kernels/, targets/, predictor/) are
installed as subpackages of this namespace (see pyproject.toml's package-dir mapping).
"""

__version__ = "0.1.0"
