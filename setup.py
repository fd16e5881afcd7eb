"""Builds the Cython hot path in ext/.

`ENGINE_DEBUG=1` builds with -O0 -g, bounds/wraparound checks and HTML annotations; `ENGINE_SANITIZE=1`
adds AddressSanitizer and UBSan (run Python with LD_PRELOAD of libasan for that build).
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("ENGINE_DEBUG") == "1"
SANITIZE = os.environ.get("ENGINE_SANITIZE") == "1"

cflags = ["-std=gnu11", "-O0", "-g"] if DEBUG else ["-std=gnu11", "-O3"]
ldflags: list[str] = []
if SANITIZE:
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address,undefined"]

MODULES = ["segment", "ring", "arena", "notify"]

extensions = [
    Extension(
        f"ext.{name}",
        [f"ext/{name}.pyx"],
        include_dirs=["ext", np.get_include()],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
