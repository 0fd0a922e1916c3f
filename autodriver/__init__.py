"""The autodriver: the standalone program that runs ``make`` for one grading job inside a VM.

``SOURCE`` is the one file drivers copy into a VM. ``COMPILE_PY`` is a small
program a driver runs with the VM's own Python, the autodriver's source on
its stdin: it prints the compiled module (an unchecked-hash ``.pyc``, which
Python runs directly), so that jobs skip compiling it each time. Python >= 3.7;
older ones fail and the driver keeps the source.
"""

from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("autodriver.py")

COMPILE_PY = """
import os, py_compile, sys, tempfile
src = os.path.join(tempfile.mkdtemp(), "autodriver.py")
with open(src, "wb") as f:
    f.write(sys.stdin.buffer.read())
py_compile.compile(src, cfile=src + "c", doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
with open(src + "c", "rb") as f:
    sys.stdout.buffer.write(f.read())
"""

__all__ = ["COMPILE_PY", "SOURCE"]
