"""Building the loop-level TIR templates from plain Python functions.

The templates (:mod:`.sparse_conv2d_cpu`, :mod:`.depthwise_cpu`) emit their loop nests through TVM's IRBuilder:
the ``T.*`` functions that TVMScript itself calls while it parses a ``@T.prim_func``, called here directly from
ordinary Python functions. They are not written as TVMScript ``@T.macro`` s because a macro is re-parsed from its
source at every expansion and, to find the active parser, walks every frame of the Python stack with
``inspect.getouterframes`` (which looks up each frame's module and source file): with the deep stack of a Relax
pass, expanding a kernel's macros costs more than compiling the kernel. A Python function that emits statements
costs a few FFI calls, and the template's static choices are plain Python ``if`` s.

How TVMScript reads in this style, inside ``with IRBuilder() as builder: with T.prim_func(): ...``:

* ``for r in T.unroll(n):`` is ``with loop("r", T.unroll(n)) as r:`` (likewise ``T.serial``, ``T.parallel``,
  ``T.vectorized``; ``range(a, b)`` is ``T.serial(a, b)``);
* ``buf[i, j] = value`` is ``T.buffer_store(buf, value, [i, j])``; reading ``buf[i, j]`` is the same;
* a run-time ``if cond:`` is ``with T.If(cond):`` holding ``with T.Then():`` and optionally ``with T.Else():``;
* a PrimFunc parameter ``x: T.Buffer(shape, "float32")`` is ``x = T.arg("x", T.buffer(shape, "float32"))``;
* ``T.meta_var(expr)`` is just the Python value ``expr``.

``builder.get()`` returns the PrimFunc once the ``with IRBuilder()`` block has closed.
"""
from __future__ import annotations

from contextlib import contextmanager

from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

__all__ = ["IRBuilder", "T", "loop", "named", "only_if", "root_block"]


@contextmanager
def loop(name: str, for_frame):
    """Enter a ``T.serial / T.parallel / T.vectorized / T.unroll`` loop and name its variable (the name shows in
    ``func.script()``)."""
    with for_frame as var:
        IRBuilder.name(name, var)
        yield var


@contextmanager
def only_if(condition, needed: bool = True):
    """Emit what is inside under a run-time ``if condition`` when the test is ``needed`` (a shape can make it
    false), else as it is."""
    if needed:
        with T.If(condition):
            with T.Then():
                yield
    else:
        yield


def named(name: str, value):
    """Name a buffer or variable as TVMScript names an assignment's target; returns ``value``."""
    IRBuilder.name(name, value)
    return value


def root_block():
    """The root block around a PrimFunc's body, for kernels with one input: Relax checks such a kernel for a reshape
    pattern (``RewriteDataflowReshape``), and that check reads the body's root block."""
    return T.sblock("root")
