"""RaPTr: random-path progressive subnetwork training for Megatron-Core."""
