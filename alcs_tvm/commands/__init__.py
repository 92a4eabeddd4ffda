"""The ``alcs`` sub-commands: argument parsing and printing only; the work is done by the library modules, which
each command imports when it runs, after its cheap checks (TVM, torch and ONNX Runtime take seconds to load; the
parsers need only :mod:`alcs_tvm.defaults`)."""
from . import compile, device, flow, profile, prune, run, tune  # noqa: A004 - named after the commands

#: in the order ``alcs --help`` lists them
COMMANDS = (compile, run, device, profile, tune, prune, flow)
