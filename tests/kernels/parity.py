"""The kernel tests' parity harness: forward and every gradient against a float64 oracle.

The measure lives in ``fusedgpt/kernels/parity.py``, so that ``bench/kernels.py`` checks
every provider by the same rule before timing it; the tests take it from here.
"""

from fusedgpt.kernels.parity import assert_parity, compare_to_reference  # noqa: F401
