"""qtc: a quantization compiler for ONNX models.

    import qtc
    result = qtc.compile("model.onnx", recipe="w8a8", calib="corpus.txt")
    result.save("model.w8a8.onnx")
    print(result.report["heldout_comparison"])
"""

__version__ = "0.1.0"

from qtc.api import CompileResult, analyze, compile, compile_within  # noqa: E402  (after __version__, which api reads)
from qtc.errors import QtcError  # noqa: E402
from qtc.recipes import Recipe, load_recipe  # noqa: E402

__all__ = ["CompileResult", "analyze", "QtcError", "Recipe", "__version__", "compile", "compile_within", "load_recipe"]
