"""qtc: a quantization compiler for ONNX models.

    import qtc
    result = qtc.compile("model.onnx", recipe="w8a8", calib="corpus.txt")
    result.save("model.w8a8.onnx")
    print(result.report["heldout_comparison"])
"""

from qtc.api import CompileResult, analyze, compile, compile_within
from qtc.errors import QtcError
from qtc.recipes import Recipe, load_recipe
from qtc.util.version import __version__

__all__ = ["CompileResult", "analyze", "QtcError", "Recipe", "__version__", "compile", "compile_within", "load_recipe"]
