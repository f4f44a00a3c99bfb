"""The calculator (kvlab/costs/calculator.py) and the prices it aggregates; imports without torch.

Attention prices live beside their techniques in the kinds table (kvlab/kinds/<kind>.py); the MLP
(mlp.py), the block's extras (block.py) and mHC (mhc.py) are priced here.
"""

from kvlab.kinds import AttnCost, causal_positions

from .calculator import Costs, LayerCosts, costs, kv_sharing_report, resolve_config
from .dtypes import DTYPE_ALIASES, DTYPE_BYTES, dtype_bytes

__all__ = ["DTYPE_ALIASES", "DTYPE_BYTES", "AttnCost", "Costs", "LayerCosts", "causal_positions", "costs",
           "dtype_bytes", "kv_sharing_report", "resolve_config"]
