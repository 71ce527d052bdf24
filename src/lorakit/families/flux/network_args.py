"""sd-scripts' `networks.lora_flux` `--network_args` (shared with Chroma in `common/bfl_network_args.py`)."""

from __future__ import annotations

from lorakit.families.common.bfl_network_args import KNOWN_KEYS, NOT_YET, TYPE_DIM_KEYS
from lorakit.families.common.bfl_network_args import BflNetworkArgs as FluxNetworkArgs

#: every key networks.lora_flux has (those lorakit does not do yet are refused by the parser with a reason)
NETWORK_ARG_KEYS = KNOWN_KEYS | frozenset(NOT_YET)

__all__ = ["FluxNetworkArgs", "KNOWN_KEYS", "NOT_YET", "TYPE_DIM_KEYS"]
