"""Build of the optional compiled kernels; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[
    # optional: without a C compiler the package installs and uses the numpy code paths instead.
    # -ffp-contract=off: no fused multiply-add, so every machine gets the same bits;
    # -fno-trapping-math: lets the clamps in the MSE loop vectorise (no result changes).
    Extension("qcompiler.calibrators._kernels", ["calibrators/_kernels.c"], optional=True,
              extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"]),
])
