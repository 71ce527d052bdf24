"""sd-scripts' `networks.lora_flux` `--network_args` (shared with Chroma in `common/bfl_network_args.py`)."""

from __future__ import annotations

from lorakit.families.common.bfl_network_args import KNOWN_KEYS, TYPE_DIM_KEYS
from lorakit.families.common.bfl_network_args import BflNetworkArgs as FluxNetworkArgs

#: every key networks.lora_flux has
NETWORK_ARG_KEYS = KNOWN_KEYS

__all__ = ["FluxNetworkArgs", "KNOWN_KEYS", "NETWORK_ARG_KEYS", "TYPE_DIM_KEYS"]
