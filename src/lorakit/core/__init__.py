"""The adapter engine: the Delta protocol, the adapted layer, layer ops, configs and the variant registry,
targeting, the in-place API and PEFT-layout files. Nothing here knows any particular variant."""
