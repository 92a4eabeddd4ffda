"""Defaults that ``alcs`` shows in its help before it loads TVM or torch: one definition each, imported from here
by the library module that uses them (which keeps exporting them under its own name)."""
from __future__ import annotations

__all__ = ["CONNECT_TIMEOUT", "FIRST_STEP_TIMEOUT", "MIN_STEP_TIMEOUT", "STEP_TIMEOUT_FACTOR",
           "DEFAULT_SPARSITIES", "FLOW_SPARSITIES", "DEFAULT_PRETRAIN_EPOCHS", "DEFAULT_RHO", "DEFAULT_UPDATES_PER_EPOCH"]

# ------------------------------------------------------------------------------- remote sessions (rpc.py)
#: bound (s) on getting a device from the tracker (a busy one included) and on opening a session with it.
CONNECT_TIMEOUT = 30.0
#: bound (s) on a kind of remote step that has not been timed on the session yet (nothing to scale from).
FIRST_STEP_TIMEOUT = 60.0
#: a remote step may take STEP_TIMEOUT_FACTOR times what the same kind of step took before, and at least this.
MIN_STEP_TIMEOUT = 30.0
STEP_TIMEOUT_FACTOR = 10.0

# ----------------------------------------------------------------------------- latency tables (profiler.py)
DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

# ----------------------------------------------------------------------------------- the flow (flow.py)
#: profiling grid of the flow: fewer points than ``alcs profile``'s default, enough for the pruner's curves
FLOW_SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95)
#: enough dense epochs (with the decayed step) for small_cnn to converge on MNIST-5k in seconds (docs/pruning.md)
DEFAULT_PRETRAIN_EPOCHS = 30

# ----------------------------------------------------------------------------------------- ADMM (pruning.py)
#: initial ADMM penalty weight: small enough for the W-step to keep learning the task, large enough that the
#: primal residual ||W - Z|| shrinks within a few epochs, so hard pruning meets prepared weights (the runs that
#: chose it: docs/pruning.md)
DEFAULT_RHO = 1e-2
#: Z/U-steps per ADMM epoch (see :func:`alcs_tvm.training.prune`)
DEFAULT_UPDATES_PER_EPOCH = 1
